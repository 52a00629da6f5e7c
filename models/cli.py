"""`profilestream train | evaluate | replay` sub-commands (the stream's CLI mounts them)."""

from __future__ import annotations

import argparse
import logging
import time

from models.data import group_by_user, select_users
from models.evaluate import evaluate, fit_intent_temperature, format_summary, format_table, summarize
from models.inference import ProfileModel, default_checkpoint_path
from models.loaders import FORMATS, LoadResult, load_events
from models.model import Dims
from models.replay import write_replay
from models.tree_peer import TreePeer
from models.train import TrainOptions, train_to_file
from streams.cli_common import Parser, add_json_flag, add_output_flag, add_quiet_flag, emit, progress_bar, show_progress

log = logging.getLogger(__name__)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="input file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="input format")
    add_json_flag(parser)
    add_quiet_flag(parser)


def _load(args: argparse.Namespace) -> LoadResult:
    """``--data`` in ``--format``, with a progress bar over the file's bytes."""
    with progress_bar(args, f"{args.command}: read log", "B", unit_scale=True) as bar:
        return load_events(args.data, args.format, progress=bar)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(default_checkpoint_path()), help="checkpoint (.pt)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def _cmd_train(args: argparse.Namespace) -> int:
    dims = Dims(hidden=args.hidden, profile_dim=args.profile_dim, cat_buckets=args.cat_buckets,
                item_buckets=args.item_buckets, cat_capacity=args.cat_memory, dropout=args.dropout)
    options = TrainOptions(dims=dims, epochs=args.epochs, batch_users=args.batch_users, lr=args.lr,
                           patience=args.patience, intent_weight=args.intent_weight, weight_decay=args.weight_decay, seed=args.seed, val_frac=args.val_frac,
                           test_frac=args.test_frac, salt=args.salt, max_vocab=args.max_vocab, device=args.device)
    loaded = _load(args)
    start = time.perf_counter()
    description = {"data": args.data.rsplit("/", 1)[-1], "format": args.format,
                   "malformed_rows": loaded.malformed_total}
    fp = train_to_file(loaded.events, options, str(args.output), description)
    seconds = time.perf_counter() - start
    emit(args, {"output": str(args.output), "fingerprint": fp, "seconds": round(seconds, 3)},
         f"wrote {args.output} (fingerprint {fp}) in {seconds:.0f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    everyone = group_by_user(_load(args).events)
    reports = []
    for path in args.model or [str(default_checkpoint_path())]:
        model = ProfileModel.load(path, args.device)
        split = model.config.split
        peer = None
        if not args.no_tree_peer:
            train_users = select_users(everyone, split, "train")
            peer = TreePeer.fit(list(train_users.values()))
            log.info("tree peer fitted on %d training users of split %r", len(train_users), split.get("salt"))
        temperature = None
        if args.calibrate:
            temperature = fit_intent_temperature(model, list(select_users(everyone, split, "val").values()))
            log.info("intent temperature %.3f fitted on the validation users of split %r", temperature,
                     split.get("salt"))
        with progress_bar(args, "evaluate", "user") as bar:
            report = evaluate(model, list(select_users(everyone, split, args.users).values()), peer, bar,
                              temperature)
        report.update(model=model.fingerprint, version=model.version, users=args.users, split=split.get("salt"))
        reports.append(report)
    if len(reports) == 1:
        emit(args, reports[0], format_table(reports[0]))
    else:
        emit(args, {"splits": reports, **summarize(reports)}, format_summary(reports))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    model = ProfileModel.load(args.model, args.device)
    loaded = _load(args)
    with open(args.output, "w", encoding="utf-8") as out:
        n = write_replay(model, loaded.events, out, progress=show_progress(args))
    emit(args, {"output": str(args.output), "predictions": n, "model": model.fingerprint},
         f"wrote {n} predictions to {args.output} (model {model.fingerprint})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register train, evaluate and replay on an argparse sub-parser set."""
    defaults = Dims()
    p = subparsers.add_parser("train", help="train a ProfileLSTM checkpoint on a behaviour log")
    _add_data_args(p)
    add_output_flag(p, "checkpoint file to write")
    p.add_argument("--epochs", type=int, default=TrainOptions.epochs, help="most epochs (early stopping may end sooner)")
    p.add_argument("--patience", type=int, default=TrainOptions.patience, help="epochs without validation gain before stopping")
    p.add_argument("--batch-users", type=int, default=TrainOptions.batch_users, help="user sequences per batch")
    p.add_argument("--lr", type=float, default=TrainOptions.lr, help="learning rate")
    p.add_argument("--intent-weight", type=float, default=TrainOptions.intent_weight,
                   help="weight of the next-type loss against the next-category loss")
    p.add_argument("--seed", type=int, default=TrainOptions.seed, help="random seed")
    p.add_argument("--val-frac", type=float, default=TrainOptions.val_frac, help="share of users for validation")
    p.add_argument("--test-frac", type=float, default=TrainOptions.test_frac, help="share of users held out for evaluate --users test")
    p.add_argument("--salt", default=TrainOptions.salt,
                   help="salt of the user split's hash (train one checkpoint per salt to evaluate over several splits)")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="LSTM hidden size")
    p.add_argument("--profile-dim", type=int, default=defaults.profile_dim, help="profile (and category vector) size")
    p.add_argument("--cat-buckets", type=int, default=defaults.cat_buckets, help="rows per category hash table")
    p.add_argument("--item-buckets", type=int, default=defaults.item_buckets, help="item hash buckets (0 = no item embedding)")
    p.add_argument("--cat-memory", type=int, default=defaults.cat_capacity, help="recent categories remembered per user")
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate")
    p.add_argument("--weight-decay", type=float, default=TrainOptions.weight_decay, help="L2 weight decay")
    p.add_argument("--max-vocab", type=int, default=TrainOptions.max_vocab, help="most global candidate categories")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("evaluate", help="metrics of a checkpoint, the baselines and the tree peer on next-event pairs")
    p.add_argument("--model", action="append",
                   help="checkpoint (.pt); repeat it with checkpoints trained on other split salts to get every "
                        "split's table plus the mean and worst split; default: the shipped checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    _add_data_args(p)
    p.add_argument("--users", default="all", choices=("all", "train", "val", "test"),
                   help="which users of the file (by the checkpoint's split); use test on the training file")
    p.add_argument("--no-tree-peer", action="store_true",
                   help="skip the gradient-boosted tree peer (it needs scikit-learn, the eval extra)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature for the model's intent on the checkpoint's validation users and also "
                        "score the model with it (model_t); judge it on --users test")
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("replay", help="the model's outputs after every event, as JSON lines")
    _add_model_args(p)
    _add_data_args(p)
    add_output_flag(p, "JSONL file to write")
    p.set_defaults(func=_cmd_replay)


def main(argv: list[str] | None = None) -> int:
    """`python -m models ...` (the product CLI is `profilestream`, which mounts the same commands)."""
    parser = Parser(prog="python -m models")
    parser.add_argument("--log-level", default="info")
    add_commands(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))

