"""`moe-ext convert`: PEFT LoRA adapters to MoLoRA and back (moe_ext.hf.peft), and
per-preference PEFT LoRAs into the expert groups of a PMoL adapter."""
from __future__ import annotations

from ..hf.peft import molora_to_peft, peft_to_molora, pmol_adapter_from_peft
from .common import (add_json, check_exists, check_writable, experts_int, fail, parse_assignments,
                     print_json, seed_int, some_experts_int)


def cmd_convert(args) -> int:
    try:
        check_writable(args.output, "--output")
        for option, path in (("--from-peft", args.from_peft), ("--to-peft", args.to_peft)):
            if path:
                check_exists(path, option)
        if args.from_peft:
            peft_to_molora(args.from_peft, args.output)
            what = f"PEFT LoRA {args.from_peft} -> one-expert MoLoRA adapter"
        elif args.to_peft:
            molora_to_peft(args.to_peft, args.output)
            what = f"MoLoRA adapter {args.to_peft} -> PEFT LoRA"
        else:
            groups = parse_assignments(args.from_peft_groups, "--from-peft-groups", "GROUP=PEFT_DIR")
            config = pmol_adapter_from_peft(groups, args.output, args.experts_per_group,
                                            args.null_experts, args.top_k, args.seed)
            what = (f"{len(config.expert_groups)} PEFT LoRAs -> PMoL adapter with groups "
                    f"{config.expert_groups}")
    except (OSError, ValueError) as err:
        return fail(str(err))
    if args.json:
        print_json({"output": args.output, "converted": what})
    else:
        print(f"{what}: wrote {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert PEFT LoRA adapters to MoLoRA and back",
                       description="Exact conversions on the adapter files (no base model "
                                   "needed): a PEFT LoRA to a one-expert MoLoRA adapter, such "
                                   "an adapter back to PEFT, or one PEFT LoRA per preference "
                                   "into the expert groups of a PMoL adapter (start "
                                   "`train-pmol --init-adapter` from it).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-peft", metavar="PEFT_DIR", help="a PEFT LoRA adapter folder")
    src.add_argument("--to-peft", metavar="MOLORA_DIR", help="a one-expert MoLoRA adapter folder")
    src.add_argument("--from-peft-groups", nargs="+", metavar="GROUP=PEFT_DIR",
                     help="one PEFT LoRA per preference group")
    p.add_argument("--output", required=True, help="the adapter folder to write")
    p.add_argument("--experts-per-group", type=experts_int, default=1, help="with --from-peft-groups")
    p.add_argument("--null-experts", type=some_experts_int, default=1, help="with --from-peft-groups")
    p.add_argument("--top-k", type=experts_int, default=2, help="with --from-peft-groups")
    p.add_argument("--seed", type=seed_int, default=0, help="router initialisation seed")
    add_json(p, "what was written")
    p.set_defaults(func=cmd_convert)
