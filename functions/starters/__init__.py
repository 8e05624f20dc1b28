"""Function templates per runtime: a folder of source files each, offered when creating a function."""

from pathlib import Path

STARTERS_DIR = Path(__file__).resolve().parent
RUNTIME_DIRS = {"python3.11": "python", "node20": "node"}
TITLES = {
    "hello": "Hello world",
    "http-json": "JSON API",
    "cloudevent": "CloudEvent handler",
    "cron": "Cron job",
}


def starters_for(runtime: str) -> list[tuple[str, str]]:
    folder = STARTERS_DIR / RUNTIME_DIRS.get(runtime, "")
    if not folder.is_dir() or folder == STARTERS_DIR:
        return []
    return [(p.name, TITLES.get(p.name, p.name)) for p in sorted(folder.iterdir()) if p.is_dir()]


def starter_files(runtime: str, name: str) -> dict[str, str]:
    if name not in dict(starters_for(runtime)):
        raise KeyError(name)
    folder = STARTERS_DIR / RUNTIME_DIRS[runtime] / name
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}
