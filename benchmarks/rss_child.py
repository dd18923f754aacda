"""Embed one long file in a fresh process and report its peak resident memory as JSON.

`python -m benchmarks.rss_child AUDIO [--threads N]` runs what `spkenc embed` does for one
file: `preprocess_wav(path)` (decode, resample, normalize, trim) and `Embedder.embed_utterance`
on RTVC's weights. It prints one JSON line: peak RSS after the imports and the model load
(`base_rss_mb`) and at the end (`peak_rss_mb`), the decoded samples and their float32 size and
the wall time.

Peak RSS is the kernel's VmHWM of this process's address space. getrusage's ru_maxrss is not
used: Linux carries the parent's peak across fork/vfork + exec into it, so a child started by a
large parent reports the parent's size (here: 827 MB before the child had read any audio).
"""

import argparse
import json
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (VmHWM of /proc/self/status, in kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    from benchmarks.rows_audio import RESEMBLYZER_RATE, pretrained_path
    from spkenc.audio import preprocess_wav, read_audio_info
    from spkenc.inference import Embedder

    embedder = Embedder.from_checkpoint(pretrained_path(), device="cpu", n_threads=args.threads)
    info = read_audio_info(args.audio)
    base = peak_rss_mb()
    started = time.perf_counter()
    wav = preprocess_wav(args.audio)
    embed = embedder.embed_utterance(wav, rate=RESEMBLYZER_RATE)
    elapsed = time.perf_counter() - started
    json.dump(
        {
            "audio": args.audio,
            "duration_s": info.duration_s,
            "decoded_samples": info.n_frames * info.channels,
            "decoded_f32_mb": info.n_frames * info.channels * 4 / 1e6,
            "trimmed_s": len(wav) / 16000,
            "base_rss_mb": base,
            "peak_rss_mb": peak_rss_mb(),
            "seconds": elapsed,
            "embedding_norm": float((embed**2).sum() ** 0.5),
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
