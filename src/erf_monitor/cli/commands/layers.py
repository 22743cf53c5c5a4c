"""``erf-monitor layers``: a model's layer names (what ``--layers`` takes), their types and
output shapes, and which ones ``--layers auto`` picks."""

from __future__ import annotations

import argparse
from typing import Any

from erf_monitor.cli.args import check_device, parse_size
from erf_monitor.cli.display import rich_console
from erf_monitor.cli.errors import CLIError, one_line
from erf_monitor.cli.options import MODEL_HELP, add_command

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """The ``layers`` command and its options."""
    layers = add_command(
        subparsers,
        "layers",
        help="list a model's layer names with their output shapes",
        description=(
            "Every named module of MODEL (the names --layers takes), its type, its output "
            "shape on a zero input of --input-size, and which ones --layers auto picks."
        ),
        epilog=MODEL_HELP,
    )
    layers.add_argument("model", metavar="MODEL", help="see below")
    layers.add_argument("--input-size", default="224", help="N or HxW", metavar="SIZE")
    layers.add_argument("--channels", type=int, default=3, help="input channels")
    layers.add_argument("--device", default="cpu", help="torch device")
    layers.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the table of ``args.model``'s layers."""
    import torch
    from rich.markup import escape
    from rich.table import Table

    from erf_monitor.cli.models import load_model
    from erf_monitor.targets.auto import pick_layers

    size = parse_size(args.input_size)
    check_device(args.device)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = load_model(args.model, num_classes=None).to(args.device).eval()
    x = torch.zeros(2, args.channels, *size, device=args.device)
    shapes: dict[str, str] = {}

    def hook(name: str) -> Any:
        def record(_m: Any, _inp: Any, out: Any) -> None:
            if name not in shapes:  # the first call, the one a probe measures
                ok = isinstance(out, torch.Tensor)
                shapes[name] = "x".join(map(str, out.shape[1:])) if ok else type(out).__name__

        return record

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # the model's own error, e.g. an input size it cannot take
        raise CLIError(f"the model failed on a {'x'.join(map(str, size))} input: "
                       f"{type(exc).__name__}: {one_line(exc)}") from None  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    try:
        auto = set(pick_layers(model, x).names)
    except ValueError:
        auto = set()
    table = Table(
        title=f"Layers of {args.model} on a {'x'.join(map(str, size))} input",
        title_justify="left",
        header_style="bold",
        caption="output: shape without the batch dim (not run: the forward never called it); "
        "auto: what --layers auto picks (one per resolution stage).",
        caption_justify="left",
    )
    for col in ("layer", "type", "output", "auto"):
        table.add_column(col, style="cyan" if col == "layer" else None, no_wrap=col != "type")
    for name, module in named:
        table.add_row(escape(name), type(module).__name__, shapes.get(name, "not run"),
                      "yes" if name in auto else "")  # fmt: skip
    rich_console().print(table)
    return 0
