"""`jaxzero prepare-data`: RareArena RDC/RDS files into prepared train/test files."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help="turn RareArena RDC/RDS files into train/test files",
                       description="Read a RareArena file (JSON Lines or a JSON array), build "
                       "the DiagnosisZero prompt for each case and write train.jsonl and "
                       "test.jsonl (first --train-ratio of the file for training).")
    p.add_argument("input", help="RareArena file, e.g. RDC.json")
    p.add_argument("out_dir", help="where train.jsonl and test.jsonl are written; refused if "
                   "it is not empty, unless --force")
    p.add_argument("--train-ratio", type=float, default=0.7)
    p.add_argument("--tokenizer", help="HF tokenizer dir or hub id; needed to tokenize and to "
                   "enforce --max-prompt-length here (without it the trainer does both)")
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--long-prompts", choices=["drop", "truncate_left"], default="drop",
                   help="what to do with prompts over --max-prompt-length (drop: as "
                   "DiagnosisZero)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed records instead of stopping")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle before splitting (off by default, as in DiagnosisZero)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty out_dir, replacing its prepared files")
    p.set_defaults(func=run)


def run(args) -> None:
    from jaxzero.diagnosis.rarearena import check_output_dir, prepare_data
    # Checked before the tokenizer loads, so a bad output path fails in a second; nothing is
    # created until the input has been read and every check has passed.
    check_output_dir(args.out_dir, force=args.force)
    tokenizer = None
    if args.tokenizer:
        from jaxzero.io.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    stats = prepare_data(args.input, args.out_dir, train_ratio=args.train_ratio,
                         tokenizer=tokenizer, max_prompt_length=args.max_prompt_length,
                         long_prompt_policy=args.long_prompts,
                         skip_bad_records=args.skip_bad_records, shuffle_seed=args.shuffle_seed,
                         force=args.force)
    print(stats.format())
