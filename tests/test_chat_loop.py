"""The REPL loop (ChatRepl) driven with scripted input against a small stand-in for engine's Session.

The stand-in keeps the Session interface of RULES.md: ``generate(messages, **sampling)`` yields
text pieces then a GenerationStats, ``prompt_ids``, ``ctx``, ``info()``, ``reset()``. Its "tokens"
are words. The real model is driven end to end in tests/test_chat_repl.py.
"""

import io
import json
import os
import re
import signal
from types import SimpleNamespace

from rich.console import Console

from engine.errors import MoeinfError
from engine.memory.stats import CacheStats
from engine.runtime.stats import GenerationStats
from moeinf_cli.repl import ChatRepl
from moeinf_cli.repl_conversation import Conversation, answer_reserve, fit_to_context, load_conversation
from moeinf_cli.repl_info import NO_LICENSE, NO_TEMPLATE, cache_delta, modelfile_lines
from moeinf_cli.repl_input import Interrupted, LineReader, file_history


class WordSession:
    """Answers ``answer N`` for the N-th question, one word per piece; a token is a word."""

    def __init__(self, ctx=4096, answer_words=4, interrupt_after=None, name="fake"):
        self.ctx = ctx
        self.name = name
        self.answer_words = answer_words
        self.interrupt_after = interrupt_after  # send ourselves SIGINT after this many pieces
        self.calls = []  # (messages, sampling) of every generate
        self.closed_early = 0
        self.resets = 0
        self.config = {}

    def prompt_ids(self, messages):
        return [0 for m in messages for _ in m["content"].split()] + [0] * (2 * len(messages))

    def generate(self, messages, **sampling):
        if sampling.get("temperature", 0) > 5:
            raise MoeinfError("temperature too high for this test")
        self.calls.append(([dict(m) for m in messages], dict(sampling)))
        n = len(self.calls)
        words = [f"answer{n}"] + [f"w{i}" for i in range(1, self.answer_words)]
        prompt = len(self.prompt_ids(messages))

        def stream():
            done = False
            try:
                for i, w in enumerate(words):
                    if self.interrupt_after is not None and i == self.interrupt_after:
                        self.interrupt_after = None  # only the first answer is interrupted
                        os.kill(os.getpid(), signal.SIGINT)
                    yield (" " if i else "") + w
                yield GenerationStats(
                    prompt_tokens=prompt,
                    prompt_eval_count=prompt,
                    prompt_eval_s=0.5,
                    generated_tokens=len(words),
                    eval_s=0.25,
                    total_s=1.0,
                )
                done = True
            finally:
                if not done:
                    self.closed_early += 1

        return stream()

    def info(self):
        return {"name": self.name, "family": "mixtral", "ctx": self.ctx, "dtype": "float32", "device": "cpu"}

    def reset(self):
        self.resets += 1


class ScriptReader:
    """Returns the scripted inputs; an ``Interrupted`` instance in the script is raised (Ctrl+C)."""

    def __init__(self, *items):
        self.items = list(items)

    def read(self):
        if not self.items:
            raise EOFError
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def make_repl(session, **kw):
    out, err, answers = io.StringIO(), io.StringIO(), io.StringIO()
    repl = ChatRepl(
        "fake",
        {"ctx": session.ctx},
        kw.pop("sampling", {}),
        kw.pop("system", None),
        kw.pop("verbose", False),
        console=Console(file=out, width=100),
        err_console=Console(file=err, width=100),
        answer_stream=answers,
        session=session,
        **kw,
    )
    return repl, out, err, answers


def test_multi_turn_conversation_goes_through_messages():
    s = WordSession()
    repl, out, _, answers = make_repl(s, system="Be brief.")
    repl.run(ScriptReader("Hello there", "", '"""Second\nquestion"""', "/bye", "never read"))
    assert len(s.calls) == 2
    first, second = s.calls[0][0], s.calls[1][0]
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert second == first + [
        {"role": "assistant", "content": "answer1 w1 w2 w3"},
        {"role": "user", "content": "Second\nquestion"},
    ]
    assert answers.getvalue() == "answer1 w1 w2 w3\n\nanswer2 w1 w2 w3\n\n"


def test_set_parameters_reach_generate_and_bad_values_stay_in_repl():
    s = WordSession()
    repl, out, _, _ = make_repl(s, sampling={"top_k": 5})
    repl.run(
        ScriptReader(
            "/set parameter temperature 0",
            "/set parameter stop END done",
            "/set parameter temperature warm",
            "/frobnicate",
            "Hi",
            "/show parameters",
        )
    )
    assert s.calls[0][1] == {"top_k": 5, "temperature": 0.0, "stop": ["END", "done"]}
    text = out.getvalue()
    assert "Set parameter 'temperature' to '0.0'" in text
    assert "Set parameter 'stop' to 'END, done'" in text
    assert "Invalid value for 'temperature': 'warm' is not a number" in text
    assert "Unknown command '/frobnicate'. Type /? for help" in text
    assert "User defined parameters:" in text and "Default parameters:" in text


def test_engine_error_is_one_line_and_repl_goes_on():
    s = WordSession()
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader("/set parameter temperature 9", "Hi", "/set parameter temperature 1", "Hi again"))
    assert "Error: temperature too high for this test" in out.getvalue()
    assert len(s.calls) == 1 and s.calls[0][0] == [{"role": "user", "content": "Hi again"}]


def test_ctrl_c_stops_the_answer_and_keeps_what_was_shown():
    s = WordSession(answer_words=50, interrupt_after=3)
    repl, _, _, answers = make_repl(s)
    repl.run(ScriptReader("Tell me a long story", "And then?"))
    assert s.closed_early == 1  # the generator was closed, not run to its end
    first_answer = s.calls[1][0][1]["content"]
    assert first_answer.startswith("answer1 w1 w2") and len(first_answer.split()) < 10
    assert s.calls[1][0][2] == {"role": "user", "content": "And then?"}
    assert answers.getvalue().startswith(first_answer + "\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_before_any_text_drops_the_question():
    s = WordSession(answer_words=5, interrupt_after=0)
    repl, _, _, _ = make_repl(s)
    repl.run(ScriptReader("Question one", "Question two"))
    assert s.calls[1][0] == [{"role": "user", "content": "Question two"}]


def test_ctrl_c_at_prompt_says_how_to_leave():
    s = WordSession()
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader(Interrupted(""), Interrupted("half typed"), "/bye"))
    assert out.getvalue().count("Use Ctrl + d or /bye to exit.") == 1


def test_verbose_prints_timing_lines_after_each_answer():
    s = WordSession()
    repl, out, err, _ = make_repl(s)
    repl.run(ScriptReader("quiet question", "/set verbose", "loud question", "/show stats"))
    lines = err.getvalue().splitlines()
    assert lines.count("eval count:           4 token(s)") == 1
    assert "eval rate:            16.00 tokens/s" in lines
    assert "Set 'verbose' mode." in out.getvalue()
    assert "prompt eval duration: 500ms" in out.getvalue()  # /show stats


def test_clear_forgets_the_conversation_but_keeps_the_system_prompt():
    s = WordSession()
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader('/set system "Speak like a pirate."', "one", "/clear", "two", "/show system"))
    assert s.calls[1][0] == [
        {"role": "system", "content": "Speak like a pirate."},
        {"role": "user", "content": "two"},
    ]
    assert s.resets == 1
    assert "Cleared session context" in out.getvalue()
    assert out.getvalue().rstrip().endswith("Speak like a pirate.")


def test_context_overflow_drops_oldest_exchanges_and_says_so():
    s = WordSession(ctx=64, answer_words=10)  # each exchange costs about 16 "tokens"; reserve 16
    repl, out, _, _ = make_repl(s, system="sys prompt")
    repl.run(ScriptReader(*[f"question number {i}" for i in range(6)]))
    last = s.calls[-1][0]
    assert last[0] == {"role": "system", "content": "sys prompt"}
    assert last[-1] == {"role": "user", "content": "question number 5"}
    assert len(s.prompt_ids(last)) <= 64 - 16
    assert {"role": "user", "content": "question number 0"} not in last
    assert "outgrew the context of 64 tokens: dropped the" in out.getvalue()


def test_message_longer_than_the_context_is_refused():
    s = WordSession(ctx=32)
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader("short", " ".join(["word"] * 40), "again"))
    assert len(s.calls) == 2 and s.calls[1][0][:2] == s.calls[0][0][:1] + [
        {"role": "assistant", "content": "answer1 w1 w2 w3"}
    ]
    m = re.search(r"This message needs (\d+) tokens but the context holds 32; shorten it, /clear, or "
                  r"/set parameter num_ctx (\d+)\.", out.getvalue())
    assert m, out.getvalue()
    assert int(m[2]) >= int(m[1]) + 256  # the suggestion holds the message and an answer, not just 2 x 32


def test_fit_to_context_unit():
    conv = Conversation(system="S")
    for i in range(5):
        conv.add_exchange(f"u{i} " * 3, f"a{i} " * 3)

    def count(messages):
        return sum(len(m["content"].split()) for m in messages)

    result = fit_to_context(conv, "new message", count, ctx=20, reserve=4)
    assert result.fits and result.prompt_tokens <= 16 and result.dropped == 3
    assert conv.exchanges == 2 and conv.turns[0]["content"].startswith("u3")
    result = fit_to_context(conv, "x " * 30, count, ctx=20, reserve=4)
    assert not result.fits and conv.exchanges == 0 and conv.system == "S"
    assert answer_reserve(4096, None) == 1024
    assert answer_reserve(4096, 100) == 100
    assert answer_reserve(100, 1000) == 50


def test_save_and_load_conversation(tmp_path):
    s = WordSession()
    repl, out, _, _ = make_repl(s, system="sys")
    path = tmp_path / "chats" / "talk.json"
    repl.run(ScriptReader("/set parameter seed 7", "first", f"/save {path}"))
    data = json.loads(path.read_text())
    assert data["model"] == "fake" and data["parameters"] == {"seed": 7}
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    model, conv, params = load_conversation(path)
    assert model == "fake" and conv.system == "sys" and conv.exchanges == 1 and params == {"seed": 7}

    s2 = WordSession()
    repl2, out2, _, _ = make_repl(s2)
    repl2.run(ScriptReader(f"/load {path}", "second"))
    assert s2.calls[0][0][:3] == data["messages"] and s2.calls[0][1] == {"seed": 7}
    assert "Loaded conversation" in out2.getvalue()


def test_load_switches_model_and_keeps_old_one_on_failure():
    loaded = []

    def loader(name, **kw):
        if name == "missing":
            raise MoeinfError("model 'missing' not found in the store; pull it with `moeinf pull missing`")
        loaded.append((name, kw))
        return WordSession(name=name)

    s = WordSession()
    repl, out, _, _ = make_repl(s, loader=loader)
    repl.run(
        ScriptReader("hello", "/load missing", "/load other", "/set parameter num_ctx 128", "/show info")
    )
    assert [n for n, _ in loaded] == ["other", "other"]
    assert loaded[1][1]["ctx"] == 128
    text = out.getvalue()
    assert "Error: model 'missing' not found in the store" in text
    assert "name                  other" in text and "family                mixtral" in text


def test_line_reader_joins_blocks():
    reader = LineReader(io.StringIO('one\n"""two\nthree\n"""\n/bye\n'))
    assert reader.read() == "one"
    assert reader.read() == '"""two\nthree\n"""'
    assert reader.read() == "/bye"


class CountingExperts:
    """An expert source whose counters grow by 10 accesses (``hits_per_answer`` hits) per answer."""

    def __init__(self, hits_per_answer):
        self.hits_per_answer = list(hits_per_answer)
        self.total = CacheStats(mode="offload", policy="lru", budget_bytes=1 << 20, slots=4)

    def answer(self):
        hits = self.hits_per_answer.pop(0)
        self.total.accesses += 10
        self.total.hits += hits
        self.total.demand_loads += 10 - hits
        self.total.bytes_loaded += (10 - hits) * 1_000_000
        self.total.layer_accesses[0] = self.total.layer_accesses.get(0, 0) + 10

    def stats(self):
        return CacheStats(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self.total).items()})


def test_verbose_cache_line_is_per_answer_and_show_stats_adds_the_total():
    s = WordSession()
    s.experts = CountingExperts([2, 8])
    plain_generate = s.generate

    def generate(messages, **sampling):
        inner = plain_generate(messages, **sampling)

        def stream():
            for item in inner:
                if not isinstance(item, str):
                    s.experts.answer()
                    item.cache = s.experts.stats()
                yield item

        return stream()

    s.generate = generate
    repl, out, err, _ = make_repl(s, verbose=True)
    repl.run(ScriptReader("one", "two", "/show stats"))
    cache_lines = [line for line in err.getvalue().splitlines() if line.startswith("expert cache:")]
    assert len(cache_lines) == 2
    assert "hit rate 20.0%, 8 demand" in cache_lines[0] and "8.0 MB loaded" in cache_lines[0]
    assert "hit rate 80.0%, 2 demand" in cache_lines[1] and "2.0 MB loaded" in cache_lines[1]
    shown = out.getvalue()
    so_far = [line for line in shown.splitlines() if line.startswith("so far:")]
    assert "hit rate 80.0%" in shown and len(so_far) == 1 and "hit rate 50.0%, 10 demand" in so_far[0]


def test_cache_delta_subtracts_counters_and_keeps_descriptions():
    before = CacheStats(
        mode="offload",
        accesses=10,
        hits=5,
        stall_s=0.5,
        resident_experts=3,
        layer_hits={0: 5},
        layer_accesses={0: 10},
    )
    after = CacheStats(
        mode="offload",
        accesses=30,
        hits=20,
        stall_s=0.75,
        resident_experts=4,
        layer_hits={0: 12, 1: 8},
        layer_accesses={0: 20, 1: 10},
    )
    d = cache_delta(after, before)
    assert (d.accesses, d.hits, d.stall_s, d.resident_experts) == (20, 15, 0.25, 4)
    assert d.layer_hits == {0: 7, 1: 8} and d.layer_accesses == {0: 10, 1: 10}
    assert cache_delta(after, None) is after


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def test_show_template_license_and_modelfile(tmp_path):
    s = WordSession()
    s.tokenizer = SimpleNamespace(chat_template=TEMPLATE)
    s.model_root = tmp_path
    (tmp_path / "LICENSE.md").write_text("Tiny licence :smile: [b]\nsecond line\n")
    repl, out, _, _ = make_repl(s, sampling={"top_k": 5})
    repl.run(ScriptReader("/show template", "/show license"))
    assert out.getvalue() == TEMPLATE + "\nTiny licence :smile: [b]\nsecond line\n"

    repl, out, _, _ = make_repl(s, system="Be brief.")
    repl.run(
        ScriptReader("/set parameter temperature 0", '/set parameter stop END "two words"', "/show modelfile")
    )
    modelfile = out.getvalue().split("Set parameter 'stop' to 'END, two words'\n")[1]
    assert modelfile == (
        '# Modelfile generated by "/show modelfile"\n'
        "FROM fake\n"
        f'TEMPLATE """{TEMPLATE}"""\n'
        'SYSTEM """Be brief."""\n'
        "PARAMETER stop END\n"
        'PARAMETER stop "two words"\n'
        "PARAMETER temperature 0.0\n"
    )


def test_show_without_template_or_license_says_so(tmp_path):
    s = WordSession()  # no tokenizer, no store folder
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader("/show template", "/show license", "/show modelfile"))
    assert (
        out.getvalue()
        == f'{NO_TEMPLATE}\n{NO_LICENSE}\n# Modelfile generated by "/show modelfile"\nFROM fake\n'
    )

    s.model_root, s.config = tmp_path, {"license": "apache-2.0"}  # a license field of the config
    s.tokenizer = SimpleNamespace(chat_template=None)
    repl, out, _, _ = make_repl(s)
    repl.run(ScriptReader("/show license", "/show template"))
    assert out.getvalue() == f"apache-2.0\n{NO_TEMPLATE}\n"


def test_modelfile_lines_name_num_ctx_only_when_not_the_default():
    assert modelfile_lines("m", None, None, {"seed": 3}, ctx=4096) == [
        '# Modelfile generated by "/show modelfile"',
        "FROM m",
        "PARAMETER seed 3",
    ]
    assert modelfile_lines("/store/m", None, "", {}, ctx=8192)[1:] == [
        "FROM /store/m",
        "PARAMETER num_ctx 8192",
    ]


class HistoryReader(ScriptReader):
    """Scripted inputs saved to a history file as the terminal prompt saves them (on Enter)."""

    def __init__(self, path, *items):
        super().__init__(*items)
        self.history = file_history(path)

    def read(self):
        text = super().read()
        self.history.append_string(text)
        return text

    def set_history(self, enabled):
        self.history.enabled = enabled


def test_set_nohistory_stops_appending_to_the_history_file(tmp_path):
    path = tmp_path / "history"
    reader = HistoryReader(
        path,
        "kept question",
        "/set nohistory",
        "secret question",
        "/show parameters",
        "/set history",
        "kept again",
    )
    repl, out, _, _ = make_repl(WordSession())
    repl.run(reader)
    assert "Set 'nohistory' mode." in out.getvalue() and "Set 'history' mode." in out.getvalue()
    saved = [line[1:] for line in path.read_text().splitlines() if line.startswith("+")]
    assert saved == ["kept question", "/set nohistory", "kept again"]
    assert "secret question" in reader.history.get_strings()  # still recalled with Up in this session

    reader = HistoryReader(path, "/set nohistory", "not saved")  # a new session saves again by default
    repl, _, _, _ = make_repl(WordSession())
    repl.run(reader)
    saved = [line[1:] for line in path.read_text().splitlines() if line.startswith("+")]
    assert saved == ["kept question", "/set nohistory", "kept again", "/set nohistory"]


def test_moeinf_nohistory_starts_a_session_without_saving(tmp_path, monkeypatch):
    path = tmp_path / "history"
    monkeypatch.setenv("MOEINF_NOHISTORY", "1")
    reader = HistoryReader(path, "not saved", "/set history", "saved")
    repl, _, _, _ = make_repl(WordSession())
    repl.run(reader)
    saved = [line[1:] for line in path.read_text().splitlines() if line.startswith("+")]
    assert saved == ["saved"]


def test_history_that_cannot_be_written_turns_saving_off_with_one_notice(tmp_path, capsys):
    (tmp_path / "home").write_text("a file where the history's directory belongs")  # as a read-only or full home
    history = file_history(tmp_path / "home" / "history")
    for text in ("first", "second", "third"):
        history.append_string(text)  # what prompt_toolkit does on every Enter
    err = capsys.readouterr().err
    assert err.count("note: input history is not saved") == 1 and "Traceback" not in err
    assert history.get_strings()[-3:] == ["first", "second", "third"]  # still recalled in this session


def test_save_to_a_directory_and_load_of_a_missing_file_are_one_line_each(tmp_path):
    s = WordSession()
    loaded = []
    repl, out, err, _ = make_repl(s, loader=lambda name, **kw: loaded.append(name))
    (tmp_path / "chats").mkdir()
    missing = tmp_path / "missing.json"
    repl.run(ScriptReader("hello", f"/save {tmp_path / 'chats'}", f"/load {missing}", "again"))
    text = out.getvalue() + err.getvalue()
    assert "Error: cannot write" in text and "a directory; give a file name" in text
    assert not (tmp_path / "chats.json").exists() and list((tmp_path / "chats").iterdir()) == []
    assert f"Error: no conversation file {missing}" in text
    assert loaded == []  # not taken for a model name
    assert len(s.calls) == 2  # the chat went on
