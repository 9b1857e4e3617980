"""The results table: one row per evaluated sample. Shared by the store, the runner and the report."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    cell_key TEXT NOT NULL,          -- sha256 of the resolved cell config (model file hash, method, settings, task, length, seed, chat, dtype, device kind)
    sample_index INTEGER NOT NULL,
    model TEXT NOT NULL,             -- name as given (e.g. smollm2-135m)
    model_hash TEXT NOT NULL,        -- sha256 of the model file (GGUF) or of config.json for folders
    method TEXT NOT NULL,
    settings_json TEXT NOT NULL,     -- resolved method settings
    budget TEXT NOT NULL,            -- as requested: "256", "0.25", or "" for full
    budget_tokens INTEGER,           -- resolved KV budget in tokens (NULL for full)
    task TEXT NOT NULL,
    family TEXT NOT NULL,            -- retrieval | multihop | aggregation | qa | passkey | niah | ppl
    length INTEGER NOT NULL,
    depth REAL,                      -- needle depth in [0, 1] for NIAH grids, else NULL
    seed INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    score REAL NOT NULL,             -- metric in [0, 1]; for ppl: the perplexity
    prediction TEXT NOT NULL,
    references_json TEXT NOT NULL,
    kv_bytes_peak INTEGER NOT NULL,  -- KV bytes actually held at peak (attnkit run)
    prefill_s REAL NOT NULL,
    decode_s_per_token REAL,         -- NULL when nothing was decoded (ppl)
    peak_mem_bytes INTEGER NOT NULL, -- CUDA max allocated, or process peak RSS on CPU
    device TEXT NOT NULL,
    dtype TEXT NOT NULL,
    extra_json TEXT NOT NULL DEFAULT '{}',  -- task-specific, e.g. per-position NLL for ppl
    attnkit_version TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    config_json TEXT NOT NULL,       -- the full resolved cell config
    created_at TEXT NOT NULL,
    UNIQUE (cell_key, sample_index)
);
CREATE INDEX IF NOT EXISTS results_cell ON results (model, method, task, length);
"""

# attnkit.zoo training runs (one row per finished run), in the same database file as the eval results.
ZOO_SCHEMA = """
CREATE TABLE IF NOT EXISTS zoo_runs (
    id INTEGER PRIMARY KEY,
    run_key TEXT NOT NULL UNIQUE,    -- sha256 of the resolved TrainConfig
    mixers TEXT NOT NULL,            -- "based" or per layer "base_conv+based"
    task TEXT NOT NULL,
    d_model INTEGER NOT NULL,
    n_layers INTEGER NOT NULL,
    vocab_size INTEGER NOT NULL,
    seq_len INTEGER NOT NULL,
    num_kv_pairs INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    accuracy REAL NOT NULL,          -- best test accuracy over epochs
    final_accuracy REAL NOT NULL,    -- test accuracy after the last epoch run
    epochs INTEGER NOT NULL,
    state_size INTEGER NOT NULL,     -- floats a decode step carries per sequence (at seq_len)
    params INTEGER NOT NULL,
    wall_s REAL NOT NULL,            -- training + evaluation time
    device TEXT NOT NULL,
    history_json TEXT NOT NULL,      -- test accuracy per epoch
    slices_json TEXT NOT NULL DEFAULT '{}',  -- a mixture run: {"TxN": [accuracy at the best epoch, state size at T]}
    config_json TEXT NOT NULL,
    finished INTEGER NOT NULL,       -- 1: ran all epochs or reached the early-stop accuracy
    attnkit_version TEXT NOT NULL,
    git_commit TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
