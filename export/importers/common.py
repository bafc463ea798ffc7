"""What every importer shares: the one-line failure, the source's identity, the atomic write into the
repository (a temporary folder beside the target, renamed into place; a failure leaves the repository as it was),
and the optimised graph variants (`--variants`, export/variants.py) written and measured inside that temporary
folder on a fixed set of texts, so a served model never lacks the variants its manifest lists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plm.data.corpus import sha256_file as sha256_of
from plm.export.repository import staging, write_manifest

if TYPE_CHECKING:
    from plm.export.variants import Reference

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # one folder name: no separators, no "..", no dot first

# The texts each variant of an imported model is measured on (Score and Embed through the served adapter): fixed,
# so two imports of one checkpoint record the same figures; varied in length (one beyond a 256-token window, to
# exercise truncation), case, script and punctuation, so padding and rare pieces are exercised.
VARIANT_TEXTS = (
    "The cat sat on the mat and looked out of the window.",
    "She opened the door slowly.",
    "In 1969, two astronauts walked on the surface of the moon.",
    "Where did you put the keys to the car?",
    "The stock market fell sharply after the announcement.",
    "Rain is expected across the north of the country tomorrow.",
    "Why is the sky blue?",
    "Scientists have discovered a new species of frog in the rainforest.",
    "A man is playing a guitar.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs are running through a field of snow.",
    "How do I reset my password if I forgot the old one?",
    "The committee will meet again next Tuesday to discuss the budget.",
    "To be, or not to be: that is the question.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "ok",
    "Hi!",
    "UPPER CASE TEXT WITH NUMBERS 1234 AND 3.14159",
    "Café au lait, s'il vous plaît.",
    "Grüße aus München – schön!",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "naïve résumé façade, emoji 🙂 and symbols ©®",
    "The train to Edinburgh leaves from platform nine at a quarter past six.",
    "Please send me the report before Friday, and copy in the whole team.",
    "Interest rates were left unchanged by the central bank on Thursday.",
    "The children were playing football in the park until it got dark.",
    "Is it possible to learn a new language in three months?",
    "He said that he would be late for dinner tonight because of the traffic.",
    "A small boat drifted towards the harbour at dawn, its sails torn by the storm.",
    "The museum's new wing displays paintings from the seventeenth century.",
    "The quick brown fox jumps over the lazy dog. " * 30,
)


class ImportFailed(Exception):
    """A source that cannot be imported; the message is one line naming the file and the problem."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {' '.join(problem.split())}")


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ImportFailed naming it."""
    if not path.is_file():
        raise ImportFailed(path, "missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ImportFailed(path, f"not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ImportFailed(path, "expected a JSON object")
    return data


def source_identity(files: list[Path], **facts: Any) -> dict[str, Any]:
    """The manifest's `source`: each file's sha256 (by name) and the facts the importer knows."""
    return {**facts, "files": {f.name: sha256_of(f) for f in files if f.is_file()}}


def check_name(name: str, repository: Path, replace: bool) -> None:
    """A model name is one plain folder name, and an existing model is replaced only when asked."""
    if not _NAME.match(name):
        raise ImportFailed(name, "is not a model name (letters, digits, '.', '_' and '-'; no path separators)")
    if (repository / name).exists() and not replace:
        raise ImportFailed(repository / name, "exists already; pass --replace to replace it (the old version "
                                              "keeps serving until the new one is in place)")


@contextmanager
def model_folder(repository: Path, name: str, replace: bool) -> Iterator[Path]:
    """An empty folder to write the model into; on success it takes the place of `repository/name` in one rename
    (export/repository.py's staging), on failure it is removed and the repository is unchanged."""
    check_name(name, repository, replace)
    with staging(repository, name) as folder:
        yield folder


def finish(folder: Path, manifest: dict[str, Any], variants: Sequence[str] = (),
           reference: Reference | None = None) -> dict[str, Any]:
    """Write the manifest (the last file written: a folder without one is never served), then the requested
    `variants`, each measured on VARIANT_TEXTS (against `reference`, the source's vectors of them, if given)."""
    written = write_manifest(folder, manifest)
    if not variants:
        return written
    from plm.export.variants import add_variants

    try:
        return add_variants(folder, variants, VARIANT_TEXTS, reference)
    except RuntimeError as e:  # a variant that fails its parity check fails the import
        raise ImportFailed(folder.name.strip(".").removesuffix(".building"), str(e)) from e
