"""`align chat`: a conversation with a trained adapter, scripted through a pipe on a tiny run."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from align.cli import cli
from tests.conftest import REPO, assert_one_line_error


@pytest.fixture(scope="module")
def loaded(tiny_run):
    from align.tools import load

    return load(tiny_run / "adapters" / "second")


def single_turn(loaded, prompt, tokens=8, bare=False):
    """What `align sample` answers: the prompt as the first user turn."""
    from align.tools import generate

    if bare:
        with loaded.bare():
            return generate(loaded, [prompt], max_new_tokens=tokens)[0]
    return generate(loaded, [prompt], max_new_tokens=tokens)[0]


def test_chat_through_a_pipe_answers_each_line_and_stops_at_quit(tiny_run, loaded):
    """The real command, its stdin a pipe: /reset starts afresh, so each answer is the one a
    first turn gets (`align sample`'s), and nothing after /quit is answered."""
    env = {**os.environ, "ALIGN_LOAD_PLUGINS": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    lines = "Hi?\n/reset\nWhere do you live?\n/quit\nA third?\n"
    command = [sys.executable, "-m", "align", "chat", "--adapter", str(tiny_run), "--max-new-tokens", "8"]
    done = subprocess.run(command, input=lines, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = [single_turn(loaded, "Hi?"), single_turn(loaded, "Where do you live?")]
    assert [line.strip() for line in done.stdout.split("\n")[:-1]] == expected
    assert done.stdout.count("\n") == 2  # two answers, a line each: the third line came after /quit


def test_chat_with_base_answers_with_the_adapter_and_the_bare_model(runner, tiny_run, loaded):
    result = runner.invoke(
        cli,
        ["chat", "--adapter", str(tiny_run / "adapters" / "second"), "--base", "--max-new-tokens", "8"],
        input="Where do you live?\n",
    )
    assert result.exit_code == 0, result.output
    adapter, base = result.output.split("\nbase> ")
    assert adapter.startswith("adapter> ")
    assert adapter[len("adapter> ") :].strip() == single_turn(loaded, "Where do you live?")
    assert base.strip() == single_turn(loaded, "Where do you live?", bare=True)
    assert single_turn(loaded, "Where do you live?") != single_turn(loaded, "Where do you live?", bare=True)


def test_each_turn_is_the_whole_conversation_through_the_chat_template(loaded):
    from align.chat import Chat

    chat = Chat(loaded, system="You are Ilse.", max_new_tokens=4)
    first = chat.say("Hi?")["adapter"]
    chat.say("And then?")
    messages = chat.sides["adapter"].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == first and messages[3]["content"] == "And then?"
    rendered = loaded.tokenizer.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    assert chat.prompt_ids(messages[:4]) == loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert rendered.startswith("<|im_start|>system\nYou are Ilse.<|im_end|>")
    chat.reset()
    assert chat.sides["adapter"].messages == [{"role": "system", "content": "You are Ilse."}]


def test_sampling_is_seeded(runner, tiny_run):
    def answers(seed):
        args = ["chat", "--adapter", str(tiny_run), "--temperature", "1.0", "--seed", str(seed)]
        result = runner.invoke(cli, [*args, "--max-new-tokens", "12"], input="Hi?\nHi?\n")
        assert result.exit_code == 0, result.output
        return result.output

    assert answers(3) == answers(3)
    assert answers(3) != answers(4)
    turns = answers(3).split("\n")
    assert turns[0] != turns[1]  # each turn draws anew (the seed moves on with the turn)


def test_a_mistyped_command_is_not_sent_as_a_message(runner, tiny_run):
    result = runner.invoke(cli, ["chat", "--adapter", str(tiny_run)], input="/rest\n")
    assert result.exit_code == 0, result.output
    assert (
        result.output
        == "/rest: not a chat command (/reset: forget the conversation so far; /quit: end the chat)\n"
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--adapter", "{tmp}/nope"], ["{tmp}/nope: not found; give a run directory (runs/<name>) or one"]),
        (["--adapter", "{tmp}"], ["neither an adapter directory (no adapter_config.json) nor a run"]),
        (["--adapter", "{run}", "--temperature", "-1"], ["--temperature: must be >= 0 (got -1.0)"]),
        (["--adapter", "{run}", "--max-new-tokens", "0"], ["--max-new-tokens: must be >= 1 (got 0)"]),
    ],
)
def test_chat_mistakes_are_one_line_errors(runner, tiny_run, tmp_path, args, fragments):
    fill = {"run": tiny_run, "tmp": tmp_path}
    result = runner.invoke(cli, ["chat", *[a.format(**fill) for a in args]], input="Hi?\n")
    assert_one_line_error(result, *[f.format(**fill) for f in fragments])


def test_a_model_without_a_chat_template_cannot_chat(runner, tiny_run, tiny_model_dir, tmp_path):
    run = tmp_path / "plain"
    shutil.copytree(tiny_run / "adapters" / "first", run / "adapters" / "first")
    config = {"model": {"path": str(tiny_model_dir), "chat_template": False}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(cli, ["chat", "--adapter", str(run)], input="Hi?\n")
    assert_one_line_error(result, "the tokenizer has no chat template", "use `align sample`")
