// attnkit attention page (attnkit/viz/page.py builds the data; this file draws it).
// Rules: no network, no innerHTML with data: every token or name goes in through textContent.
// Data layout (per layer): idx / w are (H, N, k) row-major, pooled is (H, M, M), all base64.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("ak-data").textContent);
  const N = DATA.n, K = DATA.k, M = DATA.m;
  const ROW = 18;            // px per token row in the head view
  const MIN_W = 0.004;       // links weaker than this are not drawn
  // The head view opens readable: one head and each token's few strongest links (every head with every
  // link is a tangle of H x N x k lines; the controls add heads and links, hovering isolates a token).
  const START_LINKS = 3;
  const LARGE = 560;         // px per side of the enlarged map
  const LABEL_LIMIT = 64;    // the enlarged map labels its axes up to this many tokens (one cell each)
  const LAYERS = DATA.layers;
  const $ = (id) => document.getElementById(id);

  // -- data ---------------------------------------------------------------------------------
  function bytes(b64) {
    const s = atob(b64), out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  const decoded = new Map();
  function layerArrays(l) {           // decoded once, when a view first needs the layer
    if (!decoded.has(l)) {
      const L = LAYERS[l];
      const idxBytes = bytes(L.idx).buffer;
      decoded.set(l, {
        idx: L.idx_bits === 32 ? new Uint32Array(idxBytes) : new Uint16Array(idxBytes),
        w: new Uint16Array(bytes(L.w).buffer),
        pooled: bytes(L.pooled),
      });
    }
    return decoded.get(l);
  }
  function headColor(slot, count, alpha) {
    const hue = Math.round((360 * slot) / Math.max(count, 1));
    return alpha === undefined ? `hsl(${hue} 70% 45%)` : `hsl(${hue} 70% 45% / ${alpha})`;
  }
  // a perceptual ramp (dark blue -> teal -> yellow) for maps, t in [0, 1]
  const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function ramp(t) {
    const x = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
    return STOPS[i].map((c, ch) => Math.round(c + f * (STOPS[i + 1][ch] - c)));
  }

  // -- state --------------------------------------------------------------------------------
  const state = {
    layer: 0,
    heads: new Set([0]),           // head slots shown: the first one to start with
    k: Math.min(K, START_LINKS),
    hover: null,                   // {side: "q" | "k", i}
    pinned: DATA.focus === null ? null : {side: "q", i: DATA.focus},
  };
  const focus = () => state.pinned || state.hover;

  // -- head view ----------------------------------------------------------------------------
  const scroll = $("ak-scroll"), spacer = $("ak-spacer"), links = $("ak-links");
  const left = $("ak-left"), right = $("ak-right");
  spacer.style.height = `${N * ROW}px`;
  scroll.style.height = `${Math.min(N * ROW + 2, Math.max(200, 0.7 * window.innerHeight))}px`;

  function visibleRows() {
    const first = Math.max(0, Math.floor(scroll.scrollTop / ROW) - 4);
    const last = Math.min(N - 1, Math.ceil((scroll.scrollTop + scroll.clientHeight) / ROW) + 4);
    return [first, last];
  }

  // a token as text (never markup) in an isolated run with its own direction, so right-to-left word
  // pieces (Arabic, Hebrew) read right to left and never mix with the numbers or text beside them
  function tokenText(token) {
    const span = document.createElement("span");
    span.className = "ak-text";
    span.dir = "auto";
    span.textContent = token;
    return span;
  }

  function tokenRow(side, i, shade) {
    const div = document.createElement("div");
    div.className = "ak-tok";
    div.dataset.side = side;
    div.dataset.i = String(i);
    div.style.top = `${i * ROW}px`;
    const pos = document.createElement("span");
    pos.className = "ak-pos";
    pos.dir = "ltr";
    pos.textContent = String(i);
    const text = tokenText(DATA.tokens[i]);
    if (side === "q") div.append(text, pos); else div.append(pos, text);
    div.title = `${DATA.tokens[i]} (token ${i})`;
    if (shade > 0) div.style.background = `rgba(255, 140, 0, ${Math.min(1, shade).toFixed(3)})`;
    const f = focus();
    if (f && f.side === side && f.i === i) div.classList.add("ak-on");
    return div;
  }

  // weights of the focused token's links, summed over shown heads / their count, per token on the other side
  function focusShades() {
    const f = focus(), shades = new Float32Array(N);
    if (!f) return shades;
    const A = layerArrays(state.layer), H = LAYERS[state.layer].heads.length;
    for (const h of state.heads) {
      forEachLink(A, H, h, f, (i, j, w) => { shades[f.side === "q" ? j : i] += w / state.heads.size; });
    }
    return shades;
  }

  // calls fn(i, j, w) for the shown links of head slot h touching the focus (query row i, key j)
  function forEachLink(A, H, h, f, fn) {
    if (f.side === "q") {
      const base = (h * N + f.i) * K;
      for (let r = 0; r < state.k; r++) fn(f.i, A.idx[base + r], A.w[base + r] / 65535);
    } else {
      for (let i = 0; i < N; i++) {
        const base = (h * N + i) * K;
        for (let r = 0; r < state.k; r++) if (A.idx[base + r] === f.i) fn(i, f.i, A.w[base + r] / 65535);
      }
    }
  }

  function renderTokens(first, last) {
    const shades = focusShades(), f = focus();
    const lrows = [], rrows = [];
    for (let i = first; i <= last; i++) {
      lrows.push(tokenRow("q", i, f && f.side === "k" ? shades[i] : 0));
      rrows.push(tokenRow("k", i, f && f.side === "q" ? shades[i] : 0));
    }
    left.replaceChildren(...lrows);
    right.replaceChildren(...rrows);
  }

  function drawLinks(first, last) {
    const dpr = window.devicePixelRatio || 1, cssW = 300, cssH = scroll.clientHeight;
    links.style.top = `${scroll.scrollTop}px`;
    links.style.height = `${cssH}px`;
    if (links.width !== Math.round(cssW * dpr) || links.height !== Math.round(cssH * dpr)) {
      links.width = Math.round(cssW * dpr);
      links.height = Math.round(cssH * dpr);
    }
    const ctx = links.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.lineWidth = 1.5;
    const A = layerArrays(state.layer), H = LAYERS[state.layer].heads.length, f = focus();
    const y = (i) => i * ROW + ROW / 2 - scroll.scrollTop;
    let spread = 0;                // each head's lines end at its own height within the row
    let count = 0;
    const line = (i, j, w) => {
      if (w < MIN_W) return;
      count++;
      ctx.globalAlpha = Math.min(1, f ? 0.15 + Math.sqrt(w) : 0.7 * Math.sqrt(w));  // sqrt: weak links stay visible
      ctx.beginPath();
      ctx.moveTo(2, y(i) + spread);
      ctx.lineTo(cssW - 2, y(j) + spread);
      ctx.stroke();
    };
    for (const h of state.heads) {
      ctx.strokeStyle = headColor(h, H);
      spread = H > 1 ? ((h / (H - 1)) - 0.5) * (ROW - 6) : 0;
      if (f) {
        forEachLink(A, H, h, f, line);
        continue;
      }
      for (let i = first; i <= last; i++) {
        const base = (h * N + i) * K;
        for (let r = 0; r < state.k; r++) line(i, A.idx[base + r], A.w[base + r] / 65535);
      }
    }
    ctx.globalAlpha = 1;
    links.dataset.lines = String(count);  // how many links are drawn (the tests read it)
  }

  function renderHeadView() {
    const [first, last] = visibleRows();
    renderTokens(first, last);
    drawLinks(first, last);
    drawOverviewFrame();
    const f = focus();
    if (f) {
      const role = f.side === "q" ? "query: the keys it attends to" : "key: the queries that attend to it";
      $("ak-focus").replaceChildren(`${state.pinned ? "Pinned" : "Focus"}: "`, tokenText(DATA.tokens[f.i]),
        `" (token ${f.i}) as ${role}` + (state.pinned ? ". Click it again to unpin." : "."));
    } else {
      const perToken = `up to ${state.k} strongest link${state.k === 1 ? "" : "s"} per token`;
      $("ak-focus").textContent = `Showing ${shownHeads()}, ${perToken} (add heads and links above). ` +
        "Hover a token to see only its links; click it to pin it.";
    }
  }
  function shownHeads() {
    const L = LAYERS[state.layer];
    if (L.rollout) return "the rollout";
    const heads = [...state.heads].sort((a, b) => a - b).map((slot) => L.heads[slot]);
    return heads.length === 1 ? `head ${heads[0]}` : `${heads.length} of ${L.heads.length} heads`;
  }

  let frame = 0;
  function schedule() {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderHeadView(); });
  }
  scroll.addEventListener("scroll", schedule);
  window.addEventListener("resize", schedule);
  function tokenOf(event) {
    const el = event.target.closest(".ak-tok");
    return el ? {side: el.dataset.side, i: Number(el.dataset.i)} : null;
  }
  spacer.addEventListener("mouseover", (e) => {
    const t = tokenOf(e);
    if (t && (!state.hover || state.hover.side !== t.side || state.hover.i !== t.i)) { state.hover = t; renderHeadView(); }
  });
  spacer.addEventListener("mouseleave", () => { state.hover = null; renderHeadView(); });
  spacer.addEventListener("click", (e) => {
    const t = tokenOf(e);
    if (!t) return;
    const same = state.pinned && state.pinned.side === t.side && state.pinned.i === t.i;
    state.pinned = same ? null : t;
    renderHeadView();
  });

  // layer select, head chips, links-per-token slider
  const layerSelect = $("ak-layer");
  LAYERS.forEach((L, l) => {
    const opt = document.createElement("option");
    opt.value = String(l);
    opt.textContent = L.rollout ? L.name : `${L.index}: ${L.name}`;
    layerSelect.append(opt);
  });
  layerSelect.addEventListener("change", () => {
    state.layer = Number(layerSelect.value);
    const count = LAYERS[state.layer].heads.length;  // the same heads, where this layer has them
    state.heads = new Set([...state.heads].filter((slot) => slot < count));
    if (!state.heads.size) state.heads.add(0);
    buildHeadChips();
    drawOverview();
    renderHeadView();
  });
  function buildHeadChips() {
    const L = LAYERS[state.layer], box = $("ak-heads");
    box.replaceChildren(...L.heads.map((head, slot) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "ak-head";
      b.dataset.h = String(slot);
      b.style.background = headColor(slot, L.heads.length);
      b.textContent = L.rollout ? "R" : String(head);
      b.title = L.rollout ? "rollout" : `head ${head}: ${statText(state.layer, slot)}`;
      b.setAttribute("aria-pressed", String(state.heads.has(slot)));
      b.addEventListener("click", () => {
        if (state.heads.has(slot)) state.heads.delete(slot); else state.heads.add(slot);
        b.setAttribute("aria-pressed", String(state.heads.has(slot)));
        drawOverview();
        renderHeadView();
      });
      return b;
    }));
  }
  function setAllHeads(on) {
    state.heads = new Set(on ? LAYERS[state.layer].heads.map((_, slot) => slot) : []);
    buildHeadChips();
    drawOverview();
    renderHeadView();
  }
  $("ak-all").addEventListener("click", () => setAllHeads(true));
  $("ak-none").addEventListener("click", () => setAllHeads(false));
  const kInput = $("ak-k");
  kInput.max = String(K);
  kInput.value = String(state.k);
  $("ak-k-value").textContent = String(state.k);
  kInput.addEventListener("input", () => {
    state.k = Number(kInput.value);
    $("ak-k-value").textContent = String(state.k);
    renderHeadView();
  });

  // -- maps (overview, thumbnails, enlarged) ----------------------------------------------------
  // paints the (M, M) map of head slots `slots` of layer l (their mean, each scaled by its max) into canvas
  function paintMap(canvas, l, slots) {
    const A = layerArrays(l), L = LAYERS[l];
    canvas.width = M;
    canvas.height = M;
    // the overview is read back after each paint (its band is drawn over a saved copy)
    const ctx = canvas.getContext("2d", {willReadFrequently: canvas === overview}), img = ctx.createImageData(M, M);
    const sum = new Float32Array(M * M);
    let top = 0;
    for (const s of slots) {
      const scale = L.pooled_max[s] / 255;
      for (let c = 0; c < M * M; c++) sum[c] += A.pooled[s * M * M + c] * scale;
    }
    for (let c = 0; c < M * M; c++) top = Math.max(top, sum[c]);
    for (let c = 0; c < M * M; c++) {
      const [r, g, b] = ramp(top > 0 ? Math.sqrt(sum[c] / top) : 0);  // sqrt: faint links stay visible
      img.data.set([r, g, b, 255], 4 * c);
    }
    ctx.putImageData(img, 0, 0);
  }

  const overview = $("ak-overview");
  function drawOverview() {
    paintMap(overview, state.layer, [...state.heads]);
    $("ak-overview-caption").textContent =
      `Overview: ${LAYERS[state.layer].rollout ? "rollout" : `layer ${LAYERS[state.layer].index}`}, mean of the shown heads` +
      (DATA.block > 1 ? `, pooled in ${DATA.block} x ${DATA.block} token blocks` : "") +
      ". Rows: queries, columns: keys (square root scale). Click to scroll there.";
    overviewBase = overview.getContext("2d").getImageData(0, 0, M, M);
  }
  let overviewBase = null;
  function drawOverviewFrame() {          // the rows on screen, as a band over the overview
    if (!overviewBase) return;
    const ctx = overview.getContext("2d");
    ctx.putImageData(overviewBase, 0, 0);
    const [first, last] = visibleRows();
    if (first === 0 && last === N - 1) return;  // everything is on screen
    ctx.fillStyle = "rgba(255, 255, 255, 0.25)";
    ctx.fillRect(0, first / DATA.block, M, Math.max(1, (last - first + 1) / DATA.block));
  }
  overview.addEventListener("click", (e) => {
    const rect = overview.getBoundingClientRect();
    const row = Math.floor(((e.clientY - rect.top) / rect.height) * N);
    scroll.scrollTop = Math.max(0, row * ROW - scroll.clientHeight / 2);
    schedule();
  });

  function statText(l, slot) {
    const S = DATA.stats;
    if (LAYERS[l].rollout || l >= S.entropy.length) return "";
    let text = `entropy ${S.entropy[l][slot].toFixed(2)} nats, mean distance ${S.distance[l][slot].toFixed(1)} tokens`;
    if (S.special) text += `, ${(100 * S.special[l][slot]).toFixed(1)}% to special tokens`;
    return text;
  }

  const grid = $("ak-grid");
  const H0 = Math.max(...LAYERS.map((L) => L.heads.length));
  grid.style.gridTemplateColumns = `max-content repeat(${H0}, 74px)`;
  const lazy = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      const c = e.target;
      paintMap(c, Number(c.dataset.layer), [Number(c.dataset.slot)]);
      c.dataset.drawn = "1";
      lazy.unobserve(c);
    }
  }, {rootMargin: "200px"}) : null;
  LAYERS.forEach((L, l) => {
    const label = document.createElement("div");
    label.className = "ak-rowlabel";
    label.textContent = L.rollout ? "rollout" : `layer ${L.index}`;
    label.title = L.name;
    grid.append(label);
    L.heads.forEach((head, slot) => {
      const c = document.createElement("canvas");
      c.className = "ak-thumb";
      c.dataset.layer = String(l);
      c.dataset.slot = String(slot);
      c.title = L.rollout ? L.name : `layer ${L.index}, head ${head}: ${statText(l, slot)}`;
      c.addEventListener("click", () => openModal(l, slot));
      grid.append(c);
      if (lazy) lazy.observe(c); else { paintMap(c, l, [slot]); c.dataset.drawn = "1"; }
    });
    for (let pad = L.heads.length; pad < H0; pad++) grid.append(document.createElement("div"));
  });

  const modal = $("ak-modal");
  // The enlarged map: the pooled cells scaled up, token labels on both axes when each cell is one token.
  // The labels are text elements, not canvas text, so each keeps its own direction (Arabic, Hebrew) and
  // the browser lays out its box: row labels end left of the map; column labels are turned a quarter
  // turn counter-clockwise about their top-left corner, so they start at the map's top edge and read
  // upwards, away from it.
  function paintLarge(figure, canvas, l, slot) {
    const cells = document.createElement("canvas");
    paintMap(cells, l, [slot]);
    const labels = DATA.block === 1 && N <= LABEL_LIMIT, margin = labels ? 110 : 0, gap = 4;
    const dpr = window.devicePixelRatio || 1;
    figure.style.width = figure.style.height = `${LARGE + margin}px`;
    canvas.style.left = canvas.style.top = `${margin}px`;
    canvas.style.width = canvas.style.height = `${LARGE}px`;
    canvas.width = canvas.height = Math.round(LARGE * dpr);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
    figure.replaceChildren(canvas);
    if (!labels) return;
    const cell = LARGE / N, font = Math.min(12, cell * 0.8);
    DATA.tokens.forEach((t, i) => {
      figure.append(axisLabel("ak-axis-row", t, i, 0, margin + i * cell, margin - gap, cell, font),
                    axisLabel("ak-axis-col", t, i, margin + i * cell, margin - gap, margin - gap, cell, font));
    });
  }
  function axisLabel(kind, token, i, left, top, width, height, font) {
    const div = document.createElement("div");
    div.className = `ak-axis ${kind}`;
    div.dataset.i = String(i);
    Object.assign(div.style, {left: `${left}px`, top: `${top}px`, width: `${width}px`, height: `${height}px`,
                              lineHeight: `${height}px`, fontSize: `${font}px`});
    div.title = `${token} (token ${i})`;
    div.append(tokenText(token));
    return div;
  }

  function openModal(l, slot) {
    const L = LAYERS[l];
    paintLarge($("ak-modal-figure"), $("ak-modal-map"), l, slot);
    const about = L.rollout ? "Abnar & Zuidema (2020): 0.5 A + 0.5 I per layer, heads averaged." : `${statText(l, slot)}.`;
    $("ak-modal-title").textContent = L.rollout ? `Attention ${L.name}` : `Layer ${L.index} (${L.name}), head ${L.heads[slot]}`;
    $("ak-modal-stats").textContent = `${about} Rows: queries, columns: keys` +
      (DATA.block > 1 ? `; each cell is the mean over a block of ${DATA.block} x ${DATA.block} tokens.` : ".") +
      ` Brightest cell: ${(L.pooled_max[slot]).toPrecision(3)} (square root colour scale).`;
    modal.hidden = false;
    $("ak-close").focus();
  }
  function closeModal() { modal.hidden = true; }
  $("ak-close").addEventListener("click", closeModal);
  modal.addEventListener("click", (e) => { if (e.target === modal) closeModal(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeModal(); });

  // -- statistics table -------------------------------------------------------------------------
  const STATS = [
    ["entropy", "Entropy of each head's attention rows, in nats, averaged over tokens (0: one key; ln N: uniform)."],
    ["distance", "Mean attention distance: sum over keys of weight x |query position - key position|, in tokens."],
    ["special", "Share of attention that lands on the special tokens (positions " + JSON.stringify(DATA.special) + ")."],
  ].filter(([name]) => DATA.stats[name]);
  const statSelect = $("ak-stat");
  for (const [name] of STATS) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name;
    statSelect.append(opt);
  }
  function renderStats() {
    const [name, help] = STATS.find(([n]) => n === statSelect.value) || STATS[0];
    $("ak-stat-help").textContent = help;
    const values = DATA.stats[name], table = $("ak-stats");
    const top = Math.max(...values.flat(), 1e-12);
    const head = document.createElement("tr");
    head.append(document.createElement("th"));
    LAYERS[0].heads.forEach((h) => { const th = document.createElement("th"); th.textContent = `head ${h}`; head.append(th); });
    const rows = values.map((row, l) => {
      const tr = document.createElement("tr"), th = document.createElement("th");
      th.textContent = `layer ${LAYERS[l].index}`;
      tr.append(th);
      for (const v of row) {
        const td = document.createElement("td");
        td.textContent = name === "special" ? `${(100 * v).toFixed(1)}%` : v.toFixed(2);
        td.style.background = `rgba(33, 145, 140, ${(0.6 * v / top).toFixed(3)})`;
        tr.append(td);
      }
      return tr;
    });
    table.replaceChildren(head, ...rows);
  }
  statSelect.addEventListener("change", renderStats);

  // -- tabs, header, start ----------------------------------------------------------------------
  for (const tab of document.querySelectorAll(".ak-tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll(".ak-tab")) {
        t.setAttribute("aria-pressed", String(t === tab));
        $(t.dataset.view).hidden = t !== tab;
      }
      if (tab.dataset.view === "ak-headview") schedule();
    });
  }
  $("ak-title").textContent = DATA.title;
  const nLayers = LAYERS.filter((L) => !L.rollout).length;
  $("ak-summary").textContent = `${N} tokens, ${nLayers} layers x ${LAYERS[0].heads.length} heads. ` +
    (K < N ? `The ${K} strongest keys of each token are kept per head; ` : "Every link is kept; ") +
    (DATA.block > 1 ? `thumbnails average ${DATA.block} x ${DATA.block} token blocks.` : "thumbnails are the exact maps.");
  $("ak-note").textContent = DATA.note;
  $("ak-notices").replaceChildren(...(DATA.notices || []).map((text) => {
    const p = document.createElement("p");
    p.className = "ak-notice";
    p.textContent = text;
    return p;
  }));
  buildHeadChips();
  drawOverview();
  if (STATS.length) renderStats();
  if (state.pinned) scroll.scrollTop = Math.max(0, state.pinned.i * ROW - scroll.clientHeight / 2);
  renderHeadView();
  document.body.dataset.ready = "1";
})();
