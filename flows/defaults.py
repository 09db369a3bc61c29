"""Batch and commit sizes shared by the flows and the CLI (no imports: the CLI reads them without loading the flows).

- ``BATCH_ROWS``: products handed to one predict / featurize / embed task. The model sorts them by token length into
  batches of 64, so a larger call pads less (2,000 warm products, 2026-11-23: 47 tokens a product, padded to 55.8 in
  calls of 256, 49.3 in calls of 1,024; warm bf16 in interleaved runs 217/233/233 -> 242/251/249 products/s; peak RSS
  +150-230 MB from the call's visual features, held at once).
- ``COMMIT_ROWS`` / ``COMMIT_SECONDS``: predictions or embeddings per Delta commit, or every so many seconds of work,
  whichever comes first (``flows.enrich.CommitGroups``).
- ``COMMIT_SHARE``: the most of a run's time its commits may take: a commit that took ``w`` seconds (a merge
  rewriting its table) is followed by at least ``w * (1 - share) / share`` seconds of work before the next one. 1.0
  turns this off (commits then follow the rows and seconds alone).
"""

BATCH_ROWS = 1024
COMMIT_ROWS = 16384
COMMIT_SECONDS = 30.0
COMMIT_SHARE = 0.2
