"""bench/generation.py on the tiny model: every variant is timed, the fused path is among them, and
the agreement of its greedy tokens with the exact path's (and with float32) is printed."""
import re


def test_generation_bench_times_the_fused_path_and_counts_its_tokens(capsys):
    from bench.generation import main
    main(["--model", "tiny", "--reps", "1", "--step-samples", "2", "--new-tokens", "4", "--batch", "1,2",
          "--no-append"])
    out = capsys.readouterr().out
    for b in (1, 2):
        for variant in ("bare", "user", "user-uncached", "user-fused", "bare-bf16"):
            assert re.search(rf"^\| {b} \| {variant} \| [0-9.]+ \|", out, re.M), (b, variant)
        assert re.search(rf"^\| {b} \| user-fused \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$", out, re.M)  # a step row
    shares = re.findall(r"user-fused shares ([0-9.]+)% of user's greedy tokens; the same user's model in float32 "
                        r"throughout shares ([0-9.]+)% of user's and ([0-9.]+)% of user-fused's", out)
    assert len(shares) == 2 and all(0 <= float(x) <= 100 for row in shares for x in row)
    assert "user-fused" in out.split("Personalized over bare tokens/s:")[1].splitlines()[0]
