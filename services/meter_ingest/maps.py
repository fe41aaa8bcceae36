"""Loading register maps from `hw/meters/*.yaml` files (the file-reading edge of the pure parser)."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.meter_ingest.domain.register_map import RegisterMap, RegisterMapError, parse_register_map

# hw/meters lives at the repository root, next to the `services` package.
MAPS_DIR = Path(__file__).resolve().parents[2] / "hw" / "meters"


def load_register_map(path: str | Path, maps_dir: str | Path | None = None) -> RegisterMap:
    """Read and validate one register map file.

    A bare name like `eastron_sdm120` is looked up in `maps_dir` (default: the
    repository's hw/meters; a deployment mounts its maps elsewhere).
    """
    candidate = Path(path)
    if not candidate.exists() and candidate.suffix == "" and not candidate.parent.parts:
        candidate = Path(maps_dir or MAPS_DIR) / f"{candidate.name}.yaml"
    try:
        text = candidate.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegisterMapError(f"{path}: cannot read register map: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegisterMapError(f"{candidate}: not valid YAML: {exc}") from exc
    return parse_register_map(data, origin=candidate.name)


def shipped_map_paths() -> list[Path]:
    """Every register map shipped in hw/meters, sorted by file name."""
    return sorted(MAPS_DIR.glob("*.yaml"))


def load_shipped_maps() -> list[RegisterMap]:
    return [load_register_map(path) for path in shipped_map_paths()]
