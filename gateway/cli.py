"""The gateway's command: `meterlane demo`, the whole product in a folder of its own."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(invoke_without_command=True)
@click.option("--once", is_flag=True, help="Print the report and stop (else serve until Ctrl-C).")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              default=Path("meterlane-demo"), show_default=True,
              help="The demo's own folder (its database, config and logs).")
@click.option("--port", type=int, default=None, help="The service's port (default: a free one).")
@click.option("--users", default=36, show_default=True, type=click.IntRange(1, 500))
@click.option("--upstream", metavar="URL", default=None,
              help="A real OpenAI-compatible model server (vLLM, Ollama, llama.cpp: "
                   "http://127.0.0.1:8000/v1) instead of the simulator.")
@click.option("--model", default=None, help="The model to ask --upstream for (default: the "
              "first it lists).")
@click.pass_context
def demo(ctx: click.Context, once: bool, folder: Path, port: int | None, users: int,
         upstream: str | None, model: str | None) -> None:
    """Run the whole product on the embedded default in a folder of its own: a simulated
    model server, simulated end users calling through the openai package, the paywall, the
    finance report; then the addresses to look at."""
    if ctx.invoked_subcommand is not None:
        return
    from gateway.demo import DemoError, run

    try:
        run(folder, once=once, port=port, users=users, upstream=upstream, model=model,
            echo=click.echo)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from exc
