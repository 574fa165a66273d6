"""The model zoo: checkpoints trained with `stage=train` and shipped in the repository's zoo/
folder, one per (model, dataset), named ``<model>-<dataset>.pt``. ``ckpt=zoo`` picks the one for
the run's ``model=`` and ``dataset=`` choices."""

from __future__ import annotations

from pathlib import Path

from hbgs.errors import HbgsError

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def shipped() -> list[str]:
    """Names (``<model>-<dataset>``) of the checkpoints the zoo holds."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.pt"))


def zoo_checkpoint(model: str, dataset: str) -> Path:
    """The zoo's checkpoint of ``model`` trained on ``dataset``, or an HbgsError saying what the
    zoo holds and how to train the missing one."""
    path = ZOO_DIR / f"{model}-{dataset}.pt"
    if not path.is_file():
        raise HbgsError(f"ckpt=zoo: the zoo has no {model} trained on {dataset} (it holds: "
                        f"{', '.join(shipped()) or 'nothing'}). Train one with `python -m hbgs.run stage=train "
                        f"model={model} dataset={dataset}` and pass ckpt=<its run dir>/model.pt.")
    return path


def resolve_ckpt(ckpt: str | None, model: str, dataset: str) -> str | None:
    """``ckpt`` itself, or for ``ckpt=zoo`` the path of the zoo's checkpoint for the run."""
    return str(zoo_checkpoint(model, dataset)) if ckpt == "zoo" else ckpt
