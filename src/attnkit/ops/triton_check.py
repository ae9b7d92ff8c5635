"""``python -m attnkit.ops.triton_check``: the command-line spelling of ``attnkit.ops.triton.check``."""

if __name__ == "__main__":
    from attnkit.ops.triton.check import main

    main()
