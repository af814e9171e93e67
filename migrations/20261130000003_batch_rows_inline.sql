-- A batch row (~2 kB of JSON) is rewritten on every event. Above ~2 kB
-- PostgreSQL would compress its JSON columns on every write and read them
-- back through decompression; rows up to a page stay inline and uncompressed.
-- Essay rows are updated in place (HOT) when a corrected text id arrives:
-- leave room on each page for the new versions.
ALTER TABLE batches SET (toast_tuple_target = 8160, fillfactor = 80);
ALTER TABLE batch_essays SET (fillfactor = 80);
