#!/usr/bin/env python3
"""Build a byte-level language-modelling corpus from Debian documentation packages, offline after
the download: the Python 3.11 documentation sources, the Perl PODs, the PostgreSQL 15 manual, the
git documentation, the Debian Reference and the Bash manual (all in Debian main).

    python scripts/make_corpus.py [--out corpora/debian-docs] [--max-mb 24] [--debs DIR]

It downloads the .deb files with `apt-get download` (or reads them from --debs), unpacks them
with `dpkg-deb -x`, keeps one source format per package (the reST / asciidoc sources where the
package has them, since its HTML repeats them; HTML turned into text otherwise), and writes the
documents in a fixed pseudo-random order (by a hash of their package and path) into shards of
about 1 MB, `shard-000.txt`, ..., up to --max-mb. The order matters: `kind: text` tasks hold out
the tail of the corpus for validation, and a shuffled tail is a sample of every package rather
than the last one's. `.manifest.json` (hidden, so not part of the corpus) records the package
versions, the files and the shards' sha256.

The corpus is data, not source: it is not committed (corpora/ is ignored). Use it as
`task: {kind: text, corpus: corpora/debian-docs}`; recipes/ablations/scaling.yaml does.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

# package -> the file suffixes taken from it (one format per package: see the docstring)
PACKAGES = {
    "python3.11-doc": (".txt",),  # html/_sources/**/*.rst.txt
    "perl-doc": (".pod",),  # /usr/share/perl/*/pod (the man pages repeat them)
    "postgresql-doc-15": (".html",),
    "git-doc": (".txt",),  # the asciidoc sources
    "debian-reference-en": (".html",),
    "bash-doc": (".html",),
}
SKIP_DIRS = ("/usr/share/man/", "/usr/share/lintian/")
SHARD_BYTES = 1 << 20
MIN_BYTES = 5 << 20  # less than this is no larger than what the pydoc corpus already gives


class _Text(HTMLParser):
    """HTML to plain text: scripts, styles and navigation dropped, block elements on their own
    lines, <pre> kept verbatim."""

    BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "dt", "dd", "section", "blockquote"})
    DROP = frozenset({"script", "style", "head", "nav"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.drop = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.DROP:
            self.drop += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.DROP:
            self.drop = max(0, self.drop - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.drop:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).splitlines()]
        text = "\n".join(lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def html_to_text(raw: str) -> str:
    parser = _Text()
    parser.feed(raw)
    parser.close()
    return html.unescape(parser.text())


def download(packages: list[str], folder: Path) -> dict[str, Path]:
    """package -> its .deb in folder (apt-get download, run there)."""
    found = {}
    for name in packages:
        have = sorted(folder.glob(f"{name}_*.deb"))
        if not have:
            result = subprocess.run(["apt-get", "download", name], cwd=folder, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"warning: apt-get download {name} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            have = sorted(folder.glob(f"{name}_*.deb"))
        if have:
            found[name] = have[-1]
    return found


def documents(name: str, deb: Path, scratch: Path) -> list[tuple[str, str]]:
    """(key, text) for every kept file of one package."""
    root = scratch / name
    root.mkdir(parents=True, exist_ok=True)  # dpkg-deb -x makes only the last folder
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in PACKAGES[name]):
        rel = "/" + str(path.relative_to(root))
        if any(d in rel for d in SKIP_DIRS):
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        text = html_to_text(raw) if path.suffix == ".html" else raw
        if len(text.strip()) >= 200:  # index stubs and redirects carry nothing
            docs.append((f"{name}{rel}", text.strip() + "\n"))
    return docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="corpora/debian-docs", help="the corpus folder (replaced)")
    ap.add_argument("--max-mb", type=float, default=24.0, help="stop adding documents past this many MB (default 24)")
    ap.add_argument("--debs", help="a folder that holds (or receives) the .deb files; default a temporary one")
    args = ap.parse_args(argv)
    for tool in ("dpkg-deb",) + (() if args.debs else ("apt-get",)):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH (this script needs a Debian system)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        debs = Path(args.debs) if args.debs else Path(tmp) / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        found = download(list(PACKAGES), debs)
        docs = []
        for name, deb in found.items():
            mine = documents(name, deb, Path(tmp) / "x")
            print(f"{name}: {len(mine)} documents, {sum(len(t.encode()) for _, t in mine) / 1e6:.1f} MB ({deb.name})")
            docs += mine
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    limit = int(args.max_mb * 1e6)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards, files, total, buf = [], [], 0, []
    size = 0

    def flush():
        nonlocal buf, size
        if buf:
            path = out / f"shard-{len(shards):03d}.txt"
            path.write_text("\n\n".join(buf), encoding="utf-8")
            shards.append({"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
            buf, size = [], 0

    for key, text in docs:
        n = len(text.encode())
        if total + n > limit:
            continue  # a smaller document later may still fit
        buf.append(text)
        files.append(key)
        size += n
        total += n
        if size >= SHARD_BYTES:
            flush()
    flush()
    if total < MIN_BYTES:
        print(f"error: only {total / 1e6:.1f} MB of text ({', '.join(found) or 'no package downloaded'}); "
              "the corpus would be no larger than the pydoc one", file=sys.stderr)
        return 1
    manifest = {"packages": {n: d.name for n, d in found.items()}, "documents": len(files), "bytes": total,
                "shards": shards, "files": files}
    (out / ".manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}: {len(shards)} shards, {len(files)} documents, {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
