"""Asset modules, one per group: data (raw_corpus, trimmed_wavs, mel_shards), training, evaluation."""
