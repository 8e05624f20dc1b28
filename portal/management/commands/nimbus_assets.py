"""Copy the front-end files the pages use from node_modules/ (installed by `npm ci`) into
static/vendor/, so the portal serves them itself and works offline (no CDN)."""

import re
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

# (package-relative source, destination under static/vendor/). Source maps come along because the
# minified files name them, and the manifest storage refuses a reference to a missing file.
VENDOR_FILES = [
    ("bootstrap/dist/css/bootstrap.min.css", "bootstrap/bootstrap.min.css"),
    ("bootstrap/dist/css/bootstrap.min.css.map", "bootstrap/bootstrap.min.css.map"),
    ("bootstrap/dist/js/bootstrap.bundle.min.js", "bootstrap/bootstrap.bundle.min.js"),
    ("bootstrap/dist/js/bootstrap.bundle.min.js.map", "bootstrap/bootstrap.bundle.min.js.map"),
    ("htmx.org/dist/htmx.min.js", "htmx/htmx.min.js"),
    ("bootstrap-icons/font/bootstrap-icons.min.css", "bootstrap-icons/bootstrap-icons.min.css"),
    ("bootstrap-icons/font/fonts/bootstrap-icons.woff2", "bootstrap-icons/fonts/bootstrap-icons.woff2"),
    ("bootstrap-icons/font/fonts/bootstrap-icons.woff", "bootstrap-icons/fonts/bootstrap-icons.woff"),
    ("chart.js/dist/chart.umd.min.js", "chartjs/chart.umd.min.js"),
    ("chart.js/dist/chart.umd.min.js.map", "chartjs/chart.umd.min.js.map"),
]
# Whole folders (the IDE's Monaco AMD build loads its modules and workers by relative path).
VENDOR_DIRS = [
    ("monaco-editor/min/vs", "monaco/vs"),
]
# Monaco's min/ files name source maps that live outside min/; the manifest storage would refuse them.
SOURCE_MAP_COMMENT = re.compile(rb"^\s*(//# sourceMappingURL=\S+|/\*# sourceMappingURL=\S+ \*/)\s*$", re.M)


def copy_tree_without_source_maps(source: Path, dest: Path) -> int:
    total = 0
    for item in sorted(source.rglob("*")):
        if not item.is_file():
            continue
        out = dest / item.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = item.read_bytes()
        if item.suffix in (".js", ".css"):
            data = SOURCE_MAP_COMMENT.sub(b"", data)
        out.write_bytes(data)
        total += len(data)
    return total


class Command(BaseCommand):
    help = "Copy the needed files of the npm packages into static/vendor/ (run `npm ci` first)."

    def add_arguments(self, parser):
        parser.add_argument("--node-modules", default=str(Path(settings.BASE_DIR) / "node_modules"))
        parser.add_argument("--dest", default=str(Path(settings.BASE_DIR) / "static" / "vendor"))

    def handle(self, *args, node_modules, dest, **options):
        source_root, dest_root = Path(node_modules), Path(dest)
        missing = [src for src, _ in VENDOR_FILES if not (source_root / src).is_file()]
        missing += [src for src, _ in VENDOR_DIRS if not (source_root / src).is_dir()]
        if missing:
            raise CommandError(f"Missing in {source_root}: {', '.join(missing)}. Run `npm ci` first.")
        # Start clean so a file dropped from the list does not linger and get served.
        if dest_root.exists():
            shutil.rmtree(dest_root)
        total = 0
        for src, target in VENDOR_FILES:
            out = dest_root / target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_root / src, out)
            total += out.stat().st_size
        for src, target in VENDOR_DIRS:
            total += copy_tree_without_source_maps(source_root / src, dest_root / target)
        self.stdout.write(f"Copied {len(VENDOR_FILES)} files and {len(VENDOR_DIRS)} folders ({total / 1024:.0f} KiB) into {dest_root}.")
