-- The orders pipeline's definition in SQL (DuckDB): the independent reference of its reports.
--
-- Written from the rules in docs/ARCHITECTURE.md ("The orders pipeline"), never from its code.
-- Input: the view `records` (one row per distinct (topic, partition, offset) of the day's archive,
-- contract columns). Variable `dedup_event_id` (v2: true) turns on the event_id dedup.
-- Output: views `outcomes` (partition, offset, outcome in counted/dlq/duplicates) and `report`
-- (window_start, type, events, amount; amount exact as DECIMAL(38, 6)).

-- 1. Valid JSON, strictly (RFC 8259). DuckDB's parser also accepts NaN/Infinity and trailing commas:
--    those are found in the value's skeleton (string literals blanked out) and rejected here.
CREATE OR REPLACE TEMP VIEW orders_text AS
SELECT "partition", "offset", ts_ms, txt,
       regexp_replace(txt, '"(?:[^"\\]|\\.)*"', '""', 'g') AS skeleton
FROM (
    SELECT "partition", "offset", epoch_ms("timestamp") AS ts_ms,
           CASE WHEN "value" IS NULL THEN NULL ELSE try(decode("value")) END AS txt  -- NULL: tombstone or not UTF-8
    FROM records
);

CREATE OR REPLACE TEMP TABLE orders_json AS  -- a table: both field readers below scan it (as a view, twice)
SELECT "partition", "offset", ts_ms, txt,
       len(list_distinct(json_keys(txt))) < len(json_keys(txt)) AS repeated_keys
FROM orders_text
WHERE txt IS NOT NULL
  AND json_valid(txt)
  AND json_type(txt) = 'OBJECT'
  AND NOT regexp_matches(regexp_replace(skeleton, 'true|false|null', '', 'g'), '[a-df-zA-DF-Z]')  -- NaN, Inf
  AND NOT regexp_matches(skeleton, ',[ \t\n\r]*[\]}]')  -- trailing comma
  -- at most 512 levels of nesting (only values with that many brackets need the exact depth)
  AND (length(skeleton) - length(replace(replace(skeleton, '[', ''), '{', '')) <= 512
       OR list_reduce(
            list_transform(regexp_extract_all(skeleton, '[\[\]{}]'), lambda c: CASE WHEN c IN ('[', '{') THEN 1 ELSE -1 END),
            lambda acc, x: (acc // 16777216 + x) * 16777216 + greatest(acc % 16777216, acc // 16777216 + x),
            0::BIGINT) % 16777216 <= 512);

-- 2. The four fields, typed: event_id and user_id strings, type one of the four, amount a JSON
--    number (not a bool or a string) that is finite as f64. A repeated key must be valid at every
--    occurrence, and its last occurrence counts (what the engine's decoder does). Objects without
--    repeated keys (nearly all) take a fast path that reads the four paths in one call.
CREATE OR REPLACE TEMP VIEW orders_fields_fast AS
SELECT "partition", "offset", ts_ms,
       (json_type(v[1]) = 'VARCHAR')::INT + (json_type(v[2]) = 'VARCHAR')::INT
         + (json_type(v[3]) = 'VARCHAR' AND (v[3] ->> '$') IN ('page_view', 'add_to_cart', 'purchase', 'refund'))::INT
         + (json_type(v[4]) IN ('BIGINT', 'UBIGINT', 'DOUBLE') AND isfinite(try_cast(v[4]::VARCHAR AS DOUBLE)))::INT
         AS valid_fields,
       v[1] ->> '$' AS event_id, v[3] ->> '$' AS type, try_cast(v[4]::VARCHAR AS DOUBLE) AS amount
FROM (
    SELECT "partition", "offset", ts_ms,
           json_extract(txt, ['$.event_id', '$.user_id', '$.type', '$.amount']) AS v
    FROM orders_json
    WHERE NOT repeated_keys
);

CREATE OR REPLACE TEMP VIEW orders_fields_repeated AS
SELECT "partition", "offset", ts_ms,
       count(*) FILTER (WHERE valid) AS valid_fields,
       max(CASE WHEN key = 'event_id' THEN json_value ->> '$' END) AS event_id,
       max(CASE WHEN key = 'type' THEN json_value ->> '$' END) AS type,
       max(CASE WHEN key = 'amount' THEN try_cast(json_value AS DOUBLE) END) AS amount
FROM (
    SELECT j."partition", j."offset", j.ts_ms, f.key,
           bool_and(CASE f.key
               WHEN 'amount' THEN f.type IN ('BIGINT', 'UBIGINT', 'DOUBLE') AND isfinite(try_cast(f.value AS DOUBLE))
               WHEN 'type' THEN f.type = 'VARCHAR'
                                AND (f.value ->> '$') IN ('page_view', 'add_to_cart', 'purchase', 'refund')
               ELSE f.type = 'VARCHAR' END) AS valid,
           arg_max(f.value, f.id) AS json_value
    FROM orders_json j, json_each(j.txt) f
    WHERE f.key IN ('event_id', 'user_id', 'type', 'amount')
      AND j.repeated_keys
    GROUP BY j."partition", j."offset", j.ts_ms, f.key
)
GROUP BY "partition", "offset", ts_ms;

CREATE OR REPLACE TEMP VIEW orders_valid AS
SELECT "partition", "offset", ts_ms, event_id, type, amount,
       (ts_ms // 60000) * 60000 AS window_ms  -- 1-minute tumbling windows on the Kafka timestamp
FROM (SELECT * FROM orders_fields_fast UNION ALL SELECT * FROM orders_fields_repeated)
WHERE valid_fields = 4  -- all four present and valid
  AND abs(amount) < 1e15
  AND ts_ms IS NOT NULL AND ts_ms >= 0;  -- a record without a timestamp cannot be windowed

-- 3. v2: an event_id counts once per window, whatever partition carried its copies; the copy that
--    counts is the smallest (timestamp, partition, offset), which no arrival order can change.
CREATE OR REPLACE TEMP TABLE orders_ranked AS  -- a table: both outputs below read it
SELECT *,
       CASE WHEN getvariable('dedup_event_id')
            THEN row_number() OVER (PARTITION BY window_ms, event_id ORDER BY ts_ms, "partition", "offset")
            ELSE 1 END AS copy
FROM orders_valid;

CREATE OR REPLACE TEMP VIEW outcomes AS
SELECT r."partition", r."offset",
       CASE WHEN v."offset" IS NULL THEN 'dlq' WHEN v.copy = 1 THEN 'counted' ELSE 'duplicates' END AS outcome
FROM records r
LEFT JOIN orders_ranked v ON v."partition" = r."partition" AND v."offset" = r."offset";

-- 4. Events and amount per (window, type). Amounts are summed exactly in micro-units: each amount
--    is rounded to 6 decimals (half to even, of the f64 times 10^6) before the sum.
CREATE OR REPLACE TEMP VIEW report AS
SELECT make_timestamp(window_ms * 1000) AS window_start,
       type,
       count(*)::BIGINT AS events,
       sum(round_even(amount * 1e6, 0)::DECIMAL(38, 0)) * 0.000001::DECIMAL(7, 6) AS amount
FROM orders_ranked
WHERE copy = 1
GROUP BY window_ms, type;
