"""Ollama's --verbose lines, with Go's duration format."""

from engine.runtime.stats import GenerationStats, go_duration


def test_go_duration_format():
    assert go_duration(0) == "0s"
    assert go_duration(150e-9) == "150ns"
    assert go_duration(1.5e-6) == "1.5µs"
    assert go_duration(0.012345) == "12.345ms"
    assert go_duration(0.5) == "500ms"
    assert go_duration(1.0) == "1s"
    assert go_duration(7.945641583) == "7.945641583s"
    assert go_duration(61.5) == "1m1.5s"
    assert go_duration(120) == "2m0s"
    assert go_duration(3725.25) == "1h2m5.25s"


class _Cache:
    def summary_line(self):
        return "hit rate 75.0%, 12.0 MB loaded, 0.10 s stalled"

    def as_dict(self):
        return {"hits": 3}


def test_summary_lines_match_ollama():
    s = GenerationStats(prompt_tokens=30, prompt_eval_count=26, prompt_eval_s=0.25, generated_tokens=10,
                        eval_s=2.0, load_s=1.5, total_s=3.75)
    assert s.summary_lines() == [
        "total duration:       3.75s",
        "load duration:        1.5s",
        "prompt eval count:    26 token(s)",
        "prompt eval duration: 250ms",
        "prompt eval rate:     104.00 tokens/s",
        "eval count:           10 token(s)",
        "eval duration:        2s",
        "eval rate:            5.00 tokens/s",
    ]
    assert s.cached_tokens == 4
    s.cache, s.load_s = _Cache(), 0.0
    lines = s.summary_lines()
    assert not any(line.startswith("load duration") for line in lines)  # zero: left out, as Ollama does
    assert lines[-1] == "expert cache:         hit rate 75.0%, 12.0 MB loaded, 0.10 s stalled"
    assert s.as_dict()["cache"] == {"hits": 3}
