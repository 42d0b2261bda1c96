"""Caption cleaning applied to every prompt before T5, as Bora / Open-Sora 1.0 does.

Upstream (``opensora/models/text_encoder/t5.py``, ``T5Embedder.text_preprocessing`` with
``use_text_preprocessing=True``) inherits the DeepFloyd IF caption cleaner and runs it **twice**.
The T5 embeddings the model was trained with depend on this exact string, so the order of the
steps below matters and every regex is kept as upstream wrote it, quirks included (see
``../reference/README.md`` item 12): the text is lowercased *before* ``ftfy`` sees it, a text with
more than three ``-``/``_`` loses all of them, and ``&quot;`` is removed before the HTML unescape.
"""

from __future__ import annotations

import html
import io
import re
import urllib.parse as ul

import ftfy
from bs4 import BeautifulSoup

# A URL: a scheme, or a host ending in one of a few TLDs (upstream runs it once with "https?"
# and once with "www" as the scheme; the second pass only matters for the literal "www:").
_URL_TEMPLATE = (
    r"\b((?:{scheme}:(?:\/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)"
    r"[\w/-]*\b\/?(?!@)))"
)
_URLS = [re.compile(_URL_TEMPLATE.format(scheme=s)) for s in ("https?", "www")]

# CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility, extension A,
# Yijing hexagrams, unified ideographs: each range removed on its own, as upstream does.
_CJK = [
    re.compile(r)
    for r in (
        r"[\u31c0-\u31ef]+",
        r"[\u31f0-\u31ff]+",
        r"[\u3200-\u32ff]+",
        r"[\u3300-\u33ff]+",
        r"[\u3400-\u4dbf]+",
        r"[\u4dc0-\u4dff]+",
        r"[\u4e00-\u9fff]+",
    )
]

# Every Unicode dash except the minus sign U+2212 and the figure dash's neighbours; runs become "-".
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030"
    r"\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
)

# Runs of these symbols become one space ("***WOW***", "#tag", "(parens)", "a/b").
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}")

_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")

_FILE_EXTENSIONS = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement) applied in order, before the ftfy / html.unescape pass.
_BEFORE_FIX: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"[`´«»“”¨]"), '"'),
    (re.compile(r"[‘’]"), "'"),
    (re.compile(r"&quot;?"), ""),
    (re.compile(r"&amp"), ""),
    (re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"), " "),  # IP addresses
    (re.compile(r"\d:\d\d\s+$"), ""),  # article ids at the end
    (re.compile(r"\\n"), " "),  # a literal backslash-n
    (re.compile(r"#\d{1,3}\b"), ""),  # "#123"
    (re.compile(r"#\d{5,}\b"), ""),  # "#12345..."
    (re.compile(r"\b\d{6,}\b"), ""),  # "123456..."
    (re.compile(rf"[\S]+\.(?:{_FILE_EXTENSIONS})"), ""),  # file names
    (re.compile(r"[\"\']{2,}"), '"'),  # '""quoted""'
    (re.compile(r"[\.]{2,}"), " "),  # ellipses
    (_BAD_PUNCT, " "),
    (re.compile(r"\s+\.\s+"), " "),  # a lone " . "
]

# (pattern, replacement) applied in order, after the ftfy / html.unescape pass.
_AFTER_FIX: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"), ""),  # jc6640
    (re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"), ""),  # jc6640vc
    (re.compile(r"\b\d+[a-zA-Z]+\d+\b"), ""),  # 6640vc231
    (re.compile(r"(worldwide\s+)?(free\s+)?shipping"), ""),
    (re.compile(r"(free\s)?download(\sfree)?"), ""),
    (re.compile(r"\bclick\b\s(?:for|on)\s\w+"), ""),
    (re.compile(rf"\b(?:{_FILE_EXTENSIONS})(\simage[s]?)?"), ""),
    (re.compile(r"\bpage\s+\d+\b"), ""),
    (re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"), " "),  # j2d1a2a
    (re.compile(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"), ""),  # sizes: 1920x1080, 0.8×10
    (re.compile(r"\b\s+\:\s+"), ": "),
    (re.compile(r"(\D[,\./])\b"), r"\1 "),  # a space after punctuation glued to a word
    (re.compile(r"\s+"), " "),
    (re.compile(r"^[\"\']([\w\W]+)[\"\']$"), r"\1"),  # a fully quoted caption
    (re.compile(r"^[\'\_,\-\:;]"), ""),
    (re.compile(r"[\'\_,\-\:\-\+]$"), ""),
    (re.compile(r"^\.\S+$"), ""),  # ".hidden"
]


def clean_caption(text: str) -> str:
    """One pass of the DeepFloyd IF / Open-Sora 1.0 caption cleaner."""
    caption = ul.unquote_plus(str(text))
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    for url in _URLS:
        caption = url.sub("", caption)
    # A file object parses exactly like the string but skips bs4's "looks like a filename/URL" warnings.
    caption = BeautifulSoup(io.StringIO(caption), features="html.parser").text
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    for cjk in _CJK:
        caption = cjk.sub("", caption)
    caption = _DASHES.sub("-", caption)
    for pattern, replacement in _BEFORE_FIX:
        caption = pattern.sub(replacement, caption)

    # this-is-my-cute-cat / this_is_my_cute_cat: more than three separators -> all become spaces.
    if len(_DASH_OR_UNDERSCORE.findall(caption)) > 3:
        caption = _DASH_OR_UNDERSCORE.sub(" ", caption)

    caption = ftfy.fix_text(caption)
    caption = html.unescape(html.unescape(caption)).strip()
    for pattern, replacement in _AFTER_FIX:
        caption = pattern.sub(replacement, caption)
    return caption.strip()


def text_preprocessing(text: str) -> str:
    """What T5 receives: :func:`clean_caption` applied twice, as upstream's ``T5Embedder``."""
    return clean_caption(clean_caption(text))
