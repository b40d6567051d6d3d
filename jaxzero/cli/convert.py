"""`jaxzero convert`: HF safetensors directories to jaxzero model directories and back."""

from __future__ import annotations

from jaxzero.errors import JaxzeroError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between HF safetensors and jaxzero checkpoints",
                       description="hf-to-jax HF_DIR OUT_DIR writes an orbax checkpoint with "
                       "the model config and tokenizer beside it; jax-to-hf CKPT_DIR OUT_DIR "
                       "writes an HF directory (sharded safetensors, config, tokenizer).")
    p.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    p.add_argument("src", help="HF model dir (hf-to-jax) or jaxzero checkpoint/run dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--force", action="store_true",
                   help="jax-to-hf: replace a non-empty OUT_DIR (the export is written beside "
                   "it and swapped in only once complete)")
    p.set_defaults(func=run)


def run(args) -> None:
    from jaxzero.io import model_dir
    if args.direction == "hf-to-jax":
        if args.force:
            raise JaxzeroError("--force is for jax-to-hf; hf-to-jax never replaces a directory")
        model_dir.convert_hf_to_jax(args.src, args.out_dir, dtype=args.dtype)
    else:
        model_dir.convert_jax_to_hf(args.src, args.out_dir, step=args.step, dtype=args.dtype,
                                    force=args.force)
