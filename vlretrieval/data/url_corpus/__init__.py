"""Image-text corpora given as a CSV of ``text,url,filename`` rows (CLIP-Chinese's 1.4M pairs).

The CSV names every image by URL, so building the dataset means fetching hundreds of thousands
of small files from many hosts, throwing away what is not a usable image, and converting the
rest to the raw layout of :mod:`vlretrieval.data.raw`, which the serializer reads like any
other raw dataset. Three steps, all in :func:`build_url_corpus`:

1. The CSV is read and checked row by row. A row needs a non-empty text, an http(s) URL and a
   plain file name; a file name used again with another URL, or a row repeated verbatim, is a
   defect too. Under the ``error`` policy the first defect stops the build with the file and
   line; under ``skip`` the row is dropped and reported.
2. Every distinct image is obtained by a bounded pool of threads: taken from the image cache
   when it is there and still decodes, otherwise fetched with :func:`vlretrieval.data.download.fetch`
   (timeout per network wait, retries with exponential backoff on connection errors, timeouts
   and 408/425/429/500/502/503/504, never on 404 and the like; redirects followed; our User-Agent; bytes go
   to a ``.part`` file renamed only when complete). Then it is judged: GIFs, non-images (HTML
   error pages), corrupt and truncated files and images below the minimum side are dropped.
3. Kept rows become ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``. The CSV has no splits;
   every distinct file name of the CSV is ranked by a salted sha256 of the name and the held-out
   splits take their configured number of names from the front of that ranking
   (:func:`assign_splits`). Membership is thus fixed by the CSV alone, before any download: an
   image that fails is missing from its split (reported with the split and the reason) and no
   other image takes its place, so runs in which different downloads fail still evaluate the
   same queries wherever both have the images. All texts of one file name share its image id.

Ids are positions in the CSV, so they do not move when another row's download fails: a text's
id is its data row's 0-based index and an image's id the 0-based index of its file name among
the distinct names, in order of first appearance.

The image cache (``cache_dir``) outlives the output, so a rerun resumes:

* ``images/<filename>``: bytes that passed the filter, under the CSV's own file names (a
  directory filled by the original ``download_image.py`` can be used as it is);
* ``rejected/<digest>.json``: what was wrong with a URL whose answer can only be wrong again
  (a 404, an HTML page, a GIF, ...), with the URL, so a rerun does not ask again. A marker
  whose verdict depends on a setting (minimum side, GIFs, size cap) is ignored once the
  setting no longer rejects it. Transient failures (timeouts, 408/425/429/500/502/503/504) leave
  no marker and are retried by the next run; delete ``rejected/`` to retry everything;
* ``partial/``: transfers in progress; a killed run's partial file is resumed with a Range
  request.

A cached image is decoded again on every run; one that no longer decodes (a damaged disk, a
hand-edited cache) is deleted and fetched again, while one that a stricter setting now rejects
(a larger minimum side) stays in the cache, reported as dropped, without a request.

The steps live in their own modules: :mod:`.settings` (the registry block), :mod:`.csv_rows`
(reading and checking the CSV), :mod:`.images` (judging image bytes and obtaining images into
the cache), :mod:`.splits` (the hash ranking) and :mod:`.build` (the whole build and its report).
"""

from __future__ import annotations

from .build import DROP_CATEGORIES, DROPPED_NAME, REPORT_NAME, build_url_corpus
from .csv_rows import CSV_COLUMNS, CsvRow, read_csv_rows
from .images import ImageDownloader, Outcome, judge_image
from .settings import UrlCorpusSettings
from .splits import assign_splits

__all__ = [
    "CSV_COLUMNS",
    "DROP_CATEGORIES",
    "REPORT_NAME",
    "DROPPED_NAME",
    "CsvRow",
    "ImageDownloader",
    "Outcome",
    "UrlCorpusSettings",
    "assign_splits",
    "build_url_corpus",
    "judge_image",
    "read_csv_rows",
]
