"""Markdown files of the repository: every relative link reaches a file, every anchor a heading.

GitHub's heading anchors: the heading's text, lower-cased, with punctuation dropped except
``-`` and ``_``, spaces turned into ``-``, and ``-1``, ``-2``, ... appended to repeats.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folders that hold no documentation of the project: tools' caches and environments.
_SKIPPED_DIRS = {"node_modules", "__pycache__", "results"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def markdown_files():
  found = []
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS
                     and not d.endswith(".egg-info"))
    found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".md")]
  return found


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _prose(text):
  """The text without fenced code blocks and code spans, where links are not links."""
  return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading):
  """GitHub's anchor for a heading's text (before de-duplication)."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
  text = text.lower().replace("`", "")
  return "".join("-" if c == " " else c for c in text if c.isalnum() or c in " -_")


def anchors(path):
  """Every anchor GitHub gives the headings of markdown file ``path``."""
  seen = {}
  for match in _HEADING.finditer(_FENCE.sub("", _read(path))):
    base = slug(match.group(2))
    count = seen.get(base, 0)
    seen[base] = count + 1
    yield base if count == 0 else f"{base}-{count}"


def links(path):
  text = _prose(_read(path))
  return _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)


def test_slug_follows_github():
  assert slug("Scale: devices, hosts and sweeps") == "scale-devices-hosts-and-sweeps"
  assert slug("Several architectures (per-client models)") == (
      "several-architectures-per-client-models")
  assert slug("NVIDIA H100 80GB HBM3 — 2026-11-22") == "nvidia-h100-80gb-hbm3--2026-11-22"
  assert slug("bfloat16 mixed precision (digits)") == "bfloat16-mixed-precision-digits"
  assert slug("The `--dtype` flag_name") == "the---dtype-flag_name"


def test_markdown_files_are_found():
  names = [os.path.relpath(p, ROOT) for p in markdown_files()]
  assert "README.md" in names
  assert all(not n.startswith((".", "fedjax_lib.egg-info")) for n in names)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_reach_a_file_and_a_heading(path):
  broken = []
  for target in links(path):
    if _URL_SCHEME.match(target):
      continue  # http(s), mailto: not checked offline
    file_part, _, anchor = target.partition("#")
    linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
        else path
    if os.path.relpath(linked, ROOT).startswith(".."):
      broken.append(f"{target}: outside the repository (a clone does not have it)")
    elif not os.path.exists(linked):
      broken.append(f"{target}: no such file")
    elif anchor and not linked.endswith(".md"):
      broken.append(f"{target}: an anchor into a file that is not markdown")
    elif anchor and anchor not in set(anchors(linked)):
      broken.append(f"{target}: no heading of {os.path.relpath(linked, ROOT)} has this anchor")
  assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_markdown_files_named_in_code_exist(path):
  """A file named in code (`RESULTS.md`, `experiments/x/RESULTS.md`) is one a clone has."""
  here = os.path.dirname(path)
  missing = []
  for span in re.findall(r"`([^`\s]+\.md)`", _FENCE.sub("", _read(path))):
    candidates = [os.path.join(here, span), os.path.join(ROOT, span)]
    if not any(os.path.exists(c) and not os.path.relpath(c, ROOT).startswith("..")
               for c in candidates):
      missing.append(span)
  assert not missing, f"files named but not in the repository: {missing}"
