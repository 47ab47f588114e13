"""``keel pipelines``: compile pipelines to KFP IR YAML."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Compile pipelines to KFP YAML.", no_args_is_help=True)


def compile_all(output_dir: Path) -> list[Path]:
    """Compile every pipeline to ``output_dir/<name>.yaml``; the paths written."""
    from kfp import compiler

    import pipelines

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(pipelines.PIPELINES):
        target = output_dir / f"{name}.yaml"
        compiler.Compiler().compile(pipelines.build(name), str(target))
        written.append(target)
    return written


@app.command("compile")
def compile_command(
    output_dir: Path = typer.Option(None, "--output-dir", help="Where to write; default pipelines/compiled/."),
) -> None:
    """Compile every pipeline into KFP IR YAML (what Kubeflow Pipelines uploads)."""
    import pipelines

    for path in compile_all(output_dir or pipelines.COMPILED_DIR):
        typer.echo(f"wrote {path}")
