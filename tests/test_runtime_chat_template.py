"""Chat-template rendering is identical to transformers' apply_chat_template(tokenize=False)."""

import json
import shutil

import pytest
from tiny_models import make_tokenizer

from engine.errors import MoeinfError
from engine.runtime.tokenizer import Tokenizer

CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Whitespace control by trim_blocks/lstrip_blocks (no '-' markers), and every helper transformers adds.
FEATURES = """{% set ns = namespace(count=0, last='') %}
{% for m in messages %}
    {% if m.role == 'tool' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% set ns.last = m.role %}
    {% generation %}{{ m | tojson }}{% endgeneration %}

    {{ dict(n=ns.count, role=m.role) | tojson(indent=2, sort_keys=True) }}
    {% if ns.count >= 4 %}{% break %}{% endif %}
{% endfor %}
count={{ ns.count }} last={{ ns.last }} year={{ strftime_now('%Y') }} tools={{ tools is none }} docs={{ documents is none }}
bos={{ bos_token }} eos={{ eos_token }} pad={{ pad_token }} unk={{ unk_token is defined }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TEMPLATES = {"chatml": CHATML_DEFAULT_SYSTEM, "llama3": LLAMA3, "mistral": MISTRAL, "features": FEATURES}

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Why is the sky blue?"}],
    "system": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Héllo <b>wörld</b> & \"friends\" 😀"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "  Tell me a story about a robot and a cat.  "},
        {"role": "assistant", "content": "Once upon a time..."},
        {"role": "user", "content": "Shorter, 你好."},
    ],
    "no_system_multi": [
        {"role": "user", "content": "1 2 3"},
        {"role": "assistant", "content": "4 5 6"},
        {"role": "user", "content": "7?"},
    ],
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def _with_template(base_dir, tmp_path, template, where: str):
    """A copy of the tiny tokenizer whose chat template is ``template`` (in tokenizer_config or .jinja)."""
    d = tmp_path / "tok"
    shutil.copytree(base_dir, d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if where == "jinja":
        (d / "chat_template.jinja").write_text(template)
    elif where == "config_list":
        cfg["chat_template"] = [{"name": "default", "template": template}, {"name": "rag", "template": "x"}]
    else:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _reference(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_tiny_model_template_matches_transformers(base_dir, conv, gen_prompt):
    ours, ref = Tokenizer(base_dir), _reference(base_dir)
    assert ours.chat_template == ref.chat_template
    msgs = CONVERSATIONS[conv]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt) == want
    # template variables passed by the caller (this template reads system_message)
    if msgs[0]["role"] != "system":
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt, system_message="S!")
        got = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt, system_message="S!")
        assert got == want and "<|im_start|>system\nS!<|im_end|>" in got
    # and the ids: what the runtime feeds the model equals transformers' tokenized template
    ids = ref.apply_chat_template(msgs, add_generation_prompt=gen_prompt, return_dict=False)
    assert ours.encode(ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt)) == list(ids)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("where", ["config", "jinja", "config_list"])
def test_real_world_templates_match_transformers(base_dir, tmp_path, name, where):
    d = _with_template(base_dir, tmp_path, TEMPLATES[name], where)
    ours, ref = Tokenizer(d), _reference(d)
    for conv, msgs in CONVERSATIONS.items():
        if name == "mistral" and conv == "system":
            continue
        for gen_prompt in (True, False):
            want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            got = ours.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
            assert got == want, (name, conv, gen_prompt)


def test_features_template_renders_what_it_should(base_dir, tmp_path):
    d = _with_template(base_dir, tmp_path, FEATURES, "config")
    got = Tokenizer(d).apply_chat_template(CONVERSATIONS["system"])
    assert '"content": "Héllo <b>wörld</b> & \\"friends\\" 😀"' in got  # tojson: no HTML or ASCII escaping
    assert '{\n  "n": 2,\n  "role": "user"\n}' in got  # tojson(indent, sort_keys) and dict()
    assert "bos=<s> eos=</s> pad=<pad>" in got
    assert "tools=True docs=True" in got


def test_raise_exception_becomes_moeinf_error(base_dir, tmp_path):
    d = _with_template(base_dir, tmp_path, MISTRAL, "config")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(MoeinfError, match="roles must alternate"):
        Tokenizer(d).apply_chat_template(bad)


def test_sandbox_blocks_unsafe_access(base_dir, tmp_path):
    d = _with_template(base_dir, tmp_path, "{{ messages.__class__.__mro__ }}", "config")
    with pytest.raises(MoeinfError):
        Tokenizer(d).apply_chat_template(CONVERSATIONS["one_turn"])
    d2 = tmp_path / "ns"
    d2.mkdir()
    d2 = _with_template(base_dir, d2, "{% set ns = namespace(_x=1) %}{{ ns._x }}", "config")
    with pytest.raises(Exception, match="underscore"):
        Tokenizer(d2).apply_chat_template(CONVERSATIONS["one_turn"])


def test_none_values_are_dropped_like_transformers(base_dir):
    ours, ref = Tokenizer(base_dir), _reference(base_dir)
    msgs = [{"role": "user", "content": "hi", "tool_calls": None}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_special_tokens_and_eos_list(base_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(base_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "bos_token_id": 0}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<s>", "lstrip": False, "__type": "AddedToken"}  # older dict form
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(d)
    assert tok.bos_id == 0 and tok.eos_ids == (1, 3)
    assert tok.special_tokens["bos_token"] == "<s>" and tok.special_tokens["eos_token"] == "</s>"
    assert tok.encode("Hello", add_special_tokens=True)[0] == 0
    assert tok.is_special(3) and not tok.is_special(tok.encode("Hello")[0])


def test_no_template_is_reported(base_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(base_dir, d)
    (d / "chat_template.jinja").unlink()
    tok = Tokenizer(d)
    assert not tok.has_chat_template
    with pytest.raises(MoeinfError, match="--raw"):
        tok.apply_chat_template(CONVERSATIONS["one_turn"])


def test_missing_tokenizer_is_a_moeinf_error(tmp_path):
    with pytest.raises(MoeinfError, match="tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_bos_token": True, "add_eos_token": True},
                                   {"add_eos_token": True}, {}])
@pytest.mark.parametrize("drop_post_processor", [False, True])
def test_raw_encoding_follows_bos_eos_flags_like_transformers(base_dir, tmp_path, flags, drop_post_processor):
    d = tmp_path / "t"
    shutil.copytree(base_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(flags)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if drop_post_processor:
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["post_processor"] = None
        (d / "tokenizer.json").write_text(json.dumps(tj))
    text = "Hello wörld 😀"
    want = _reference(d)(text)["input_ids"]
    assert Tokenizer(d).encode(text, add_special_tokens=True) == list(want)
