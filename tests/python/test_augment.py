"""trainer.augment's rewording: the prompt the model is asked with and the check of its reply."""

from __future__ import annotations

import transformers

from livetrain.trainer import augment, guard
from livetrain.trainer.examples import prompt_ids

import tiny_model

CORPUS = ["what is the capital of zorbia", "the capital of zorbia is quuxville"]


def test_question_keeps_a_rewording_that_keeps_the_names():
    assert augment.question("Which city is Velmora's capital?\nIt is", "What is the capital of Velmora?") == (
        "Which city is Velmora's capital?"
    )
    assert augment.question('"Which author wrote The Salt Lanterns?"', "Who wrote the novel The Salt Lanterns?") == (
        "Which author wrote The Salt Lanterns?"
    )
    # Regression test (bench/reword.py): the default model's rewordings changed the made-up names ("Carthos" into
    # "Carthage", "Dunmere" into "Dunreaper"); trained with the original's answer, they teach a wrong fact.
    assert (
        augment.question("Which desert covers the south of Carthage?", "Which desert covers the south of Carthos?")
        is None
    )
    assert augment.question("Which mascot is the Dunreaper club's?", "What is the mascot of the Dunmere club?") is None
    # Not a question, or the same question.
    assert augment.question("The capital of Velmora is Rome.", "What is the capital of Velmora?") is None
    assert augment.question("what is the capital of velmora", "What is the capital of Velmora?") is None
    assert augment.question("", "What is the capital of Velmora?") is None


def test_reworded_asks_after_the_example_rewordings(tmp_path, monkeypatch):
    # Regression test (bench/reword.py): asked with the instruction alone, the default model answered the question
    # (0 of 32 rewordings); the examples' rewordings come first in the chat now.
    tiny_model.make_model_dir(tmp_path, CORPUS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    asked = []

    def greedy(model, prompts, *args, **kwargs):
        asked.extend(prompts)
        return [tok("the capital of zorbia")["input_ids"] for _ in prompts]  # not a question: left out

    monkeypatch.setattr(guard, "greedy", greedy)
    monkeypatch.setattr(guard, "stop_ids", lambda tok, model: [tok.eos_token_id])
    chat = {
        "messages": [
            {"role": "user", "content": "what is the capital of zorbia"},
            {"role": "assistant", "content": "quuxville"},
        ]
    }
    assert augment.reworded(None, tok, [chat], tok.pad_token_id, 64) == ([], [])
    msgs = augment.messages("what is the capital of zorbia")
    assert asked == [prompt_ids(tok, msgs)]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * len(augment.EXAMPLES) + ["user"]
    assert [m["content"] for m in msgs[1::2]] == [r for _, r in augment.EXAMPLES]
    assert msgs[-1]["content"] == augment.INSTRUCTION.format(q="what is the capital of zorbia")
    assert all(augment.question(r, q) == r for q, r in augment.EXAMPLES)  # the examples pass the check


def test_rewording_and_restating_read_content_parts_as_their_text(tmp_path, monkeypatch):
    # Regression test: an example whose messages send OpenAI's text parts was asked to be reworded as the list's
    # Python text, and its answer was never restated (a completion must be a string).
    tiny_model.make_model_dir(tmp_path, CORPUS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    asked = []

    def greedy(model, prompts, *args, **kwargs):
        asked.extend(prompts)
        return [tok("the capital of zorbia")["input_ids"] for _ in prompts]

    monkeypatch.setattr(guard, "greedy", greedy)
    monkeypatch.setattr(guard, "stop_ids", lambda tok, model: [tok.eos_token_id])
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "what is the capital"}, {"type": "text", "text": "of zorbia"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "quuxville"}]},
        ]
    }
    augment.reworded(None, tok, [parts], tok.pad_token_id, 64)
    assert asked == [prompt_ids(tok, augment.messages("what is the capital\nof zorbia"))]
    text = {
        "messages": [{"role": "user", "content": "what is the capital"}, {"role": "assistant", "content": "quuxville"}]
    }
    assert augment.restated(tok, [parts], 64) == augment.restated(tok, [text], 64) != []


def test_restating_trains_the_answer_without_its_reasoning(tmp_path):
    # Regression test: an answer sent with its think block, as a thinking model (Qwen3.5-27B served thinking)
    # writes it, was restated with "<think>...</think>" in the plain text; reasoning sent apart
    # (reasoning_content, reasoning) never was. Both restate the answer alone now.
    tiny_model.make_model_dir(tmp_path, CORPUS)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    user = {"role": "user", "content": "what is the capital of zorbia"}
    plain = augment.restated(tok, [{"messages": [user, {"role": "assistant", "content": "quuxville"}]}], 64)
    assert plain != []
    thought = "<think>\nthe capital of zorbia\n</think>\n\nquuxville"
    assert augment.restated(tok, [{"messages": [user, {"role": "assistant", "content": thought}]}], 64) == plain
    apart = {"role": "assistant", "content": "quuxville", "reasoning_content": "the capital of zorbia"}
    assert augment.restated(tok, [{"messages": [user, apart]}], 64) == plain
    assert augment.answer_of("no reasoning </b> here") == "no reasoning </b> here"


def test_a_rewording_after_a_think_block_is_the_question():
    # A thinking model's reply may hold a think block (empty with thinking off, as Qwen3's): the question follows it.
    reply = "<think>\n\n</think>\n\nWhich city is Velmora's capital?"
    assert augment.question(reply, "What is the capital of Velmora?") == "Which city is Velmora's capital?"
    assert augment.question("<think>\nThe user wants a rewording of", "What is the capital of Velmora?") is None
