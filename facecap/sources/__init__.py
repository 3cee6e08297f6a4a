"""Where images come from: planning sources into shards, reading them, downloading URLs.

One module per concern: ``spec`` (what a shard reads), ``plan`` (sources into
shards), the readers (``folder``, ``tar``, ``parquet``, ``urllist``) and
``reader`` (any shard, and its bytes again later), ``captions`` (sidecar and
caption text), ``batch`` (raw images into image records), ``images`` (safe
image probing and decoding) and ``downloader`` (URLs to bytes).

Input is treated as hostile: no file, member or sidecar is read past its
limit (image.max_bytes, MAX_TEXT_BYTES); tar links, devices, FIFOs and
names that are absolute, climb out with ``..`` or run past MAX_MEMBER_NAME
are rejected as unsafe_member, and a tar key's second image as
duplicate_member; a Parquet column of the wrong type is rejected naming
it; captions keep every character but control characters (removed and
counted), decoded from UTF-8 or, failing that, an encoding that is recorded.
Nothing here raises on bad input: an unreadable source becomes a reject that
says why. Nothing here knows stages, the runner, Prefect or Dask.
"""
