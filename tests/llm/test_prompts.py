"""Prompt templates, prompt building and answer-only tokenization.

The tokenizer tests use a tiny byte-level tokenizer built offline (one token per byte, so decoding gives the text
back exactly), with and without a chat template, and a tiny random Llama (both from ``tiny_llm``). One test uses the
real SmolLM2 tokenizer from the default backbone (converted once, then cached).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, before transformers reads its settings

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import yaml
from tiny_llm import byte_tokenizer, tiny_llama

from recadapt.errors import ConfigError
from recadapt.llm import load_backbone
from recadapt.llm.encoding import IGNORE_INDEX, ItemTokenizer
from recadapt.llm.injection import ItemProjector, embed_with_items
from recadapt.llm.prompt_templates import available_domains, load_templates, parse_templates
from recadapt.llm.prompts import (
    EVAL_TEMPLATE_INDEX,
    ITEM_TOKEN,
    USER_ITEM_ID,
    USER_TOKEN_TEXT,
    Prompt,
    build_ctr_prompt,
    build_next_item_prompt,
    ctr_answer,
    describe_item,
    pick_template_index,
)

DOMAINS = ("artist", "game", "item", "movie")
HISTORY = ["Heat (1995)", "Fargo (1996)", "Alien (1979)"]
HISTORY_IDS = [4, 7, 1]
CANDIDATES = ["Babe (1995)", "Casino (1995)"]
CANDIDATE_IDS = [9, 2]


def hybrid_prompt(history: list[str] = HISTORY, ids: list[int] = HISTORY_IDS) -> Prompt:
    return build_next_item_prompt(
        history, CANDIDATES, "movie", 0, hybrid=True, history_ids=ids, candidate_ids=CANDIDATE_IDS
    )


def labelled(batch_labels: torch.Tensor, row: int) -> list[int]:
    return [t for t in batch_labels[row].tolist() if t != IGNORE_INDEX]


# --- templates ----------------------------------------------------------------------------------------------------


def test_every_domain_has_three_next_item_templates_and_a_ctr_template() -> None:
    assert tuple(available_domains()) == DOMAINS
    for domain in DOMAINS:
        templates = load_templates(domain)
        assert templates.domain == domain
        assert len(templates.next_item.templates) == 3
        for text in templates.next_item.templates:
            assert "{history}" in text and "{candidates}" in text
        ctr = templates.ctr
        assert "{history}" in ctr.prompt and "{target}" in ctr.prompt
        assert "{items}" in ctr.history_rated and "{rating}" in ctr.item_rated
        assert (ctr.answer_yes, ctr.answer_no) == ("Yes.", "No.")


def test_the_movie_templates_are_llaras() -> None:
    text = build_next_item_prompt(["A"], ["B", "C"], "movie", EVAL_TEMPLATE_INDEX).text
    assert text == (
        "This user has watched A in the previous. Please predict the next movie this user will watch. "
        "Choose the answer from the following 2 movie titles: B, C. Answer:"
    )


def _write_templates(folder: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(Path(load_templates("movie").source).read_text(encoding="utf-8"))
    mutate(data)
    (folder / "movie.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return folder / "movie.yaml"


def _set_template(data: dict[str, Any]) -> None:
    data["next_item"]["templates"][1] = "Watched {histroy}; pick from {candidates}:"


def _drop_answer(data: dict[str, Any]) -> None:
    del data["ctr"]["answer_no"]


def _spec(data: dict[str, Any]) -> None:
    data["ctr"]["item_rated"] = "{index}. {title} ({rating:.1f} stars)"


def _missing_field(data: dict[str, Any]) -> None:
    data["ctr"]["prompt"] = "{profile}{history} Will the user like it?"


def _typo_key(data: dict[str, Any]) -> None:
    data["ctr"]["separtor"] = data["ctr"].pop("separator")


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (_set_template, "next_item.templates[1]", "{histroy}"),
        (_drop_answer, "ctr.answer_no", "missing"),
        (_spec, "ctr.item_rated", "format spec"),
        (_missing_field, "ctr.prompt", "{target}"),
        (_typo_key, "ctr.separator", "is missing (unknown keys here: separtor)"),
    ],
)
def test_a_malformed_template_file_names_the_file_and_the_key(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], key: str, words: str
) -> None:
    path = _write_templates(tmp_path, mutate)
    with pytest.raises(ConfigError) as caught:
        load_templates("movie", directory=tmp_path)
    message = str(caught.value)
    assert str(path) in message and f"'{key}'" in message and words in message
    assert caught.value.field == key


def test_invalid_yaml_and_unknown_domain_are_reported(tmp_path: Path) -> None:
    (tmp_path / "movie.yaml").write_text("next_item: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="movie.yaml.*invalid YAML"):
        load_templates("movie", directory=tmp_path)
    with pytest.raises(ValueError, match="known domains: artist, game, item, movie"):
        load_templates("books")


def test_template_choice_is_seeded_per_sample_and_epoch() -> None:
    draws = [pick_template_index(3, seed=5, sample_index=i) for i in range(300)]
    assert draws == [pick_template_index(3, seed=5, sample_index=i) for i in range(300)]
    assert set(draws) == {0, 1, 2}
    assert draws != [pick_template_index(3, seed=5, sample_index=i, epoch=1) for i in range(300)]


# --- prompt texts -------------------------------------------------------------------------------------------------


def test_text_only_prompt_has_titles_and_no_placeholder() -> None:
    prompt = build_next_item_prompt(HISTORY, CANDIDATES, "movie", 1)
    assert ITEM_TOKEN not in prompt.text and prompt.item_ids == ()
    assert "Heat (1995), Fargo (1996), Alien (1979)" in prompt.text
    assert "Babe (1995), Casino (1995)" in prompt.text


def test_hybrid_prompt_marks_every_item_and_lists_ids_in_text_order() -> None:
    prompt = hybrid_prompt()
    assert f"Heat (1995) {ITEM_TOKEN}, Fargo (1996) {ITEM_TOKEN}, Alien (1979) {ITEM_TOKEN}" in prompt.text
    assert prompt.text.count(ITEM_TOKEN) == 5
    assert prompt.item_ids == (4, 7, 1, 9, 2)
    # a template listing candidates first puts their ids first
    data = yaml.safe_load(Path(load_templates("movie").source).read_text())
    data["next_item"]["templates"] = ["Choose from {candidates} after {history}:"]
    swapped = parse_templates(data, source="inline", domain="movie")
    reordered = build_next_item_prompt(
        HISTORY, CANDIDATES, swapped, 0, True, history_ids=HISTORY_IDS, candidate_ids=CANDIDATE_IDS
    )
    assert reordered.item_ids == (9, 2, 4, 7, 1)


def test_placeholders_can_precede_their_titles() -> None:
    """``placement="before"`` writes ``<|item|> Title`` (the title's first token right after the CRM vector),
    with the same ids in the same order; the text form is unchanged."""
    after = hybrid_prompt()
    before = build_next_item_prompt(
        HISTORY,
        CANDIDATES,
        "movie",
        0,
        True,
        history_ids=HISTORY_IDS,
        candidate_ids=CANDIDATE_IDS,
        placement="before",
    )
    assert f"{ITEM_TOKEN} Heat (1995), {ITEM_TOKEN} Fargo (1996), {ITEM_TOKEN} Alien (1979)" in before.text
    assert before.item_ids == after.item_ids and before.text.count(ITEM_TOKEN) == 5
    ctr = build_ctr_prompt(
        ["Heat"], "Babe", "movie", hybrid=True, history_ids=[3], target_id=8, placement="before"
    )
    assert f"1. {ITEM_TOKEN} Heat" in ctr.text and f"***{ITEM_TOKEN} Babe***" in ctr.text
    text_only = build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, placement="before")
    assert text_only == build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0)
    with pytest.raises(ValueError, match="placement must be one of"):
        build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, placement="inside")


def test_a_user_token_opens_the_history_of_hybrid_prompts_only() -> None:
    """``user_token``: one more placeholder, id USER_ITEM_ID, before the first history item (in the chosen
    placement); text-only prompts (LLaRA's curriculum steps) stay as they were."""
    kwargs = dict(history_ids=HISTORY_IDS, candidate_ids=CANDIDATE_IDS, placement="before")
    plain = build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, True, **kwargs)
    with_user = build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, True, user_token=True, **kwargs)
    assert f"{ITEM_TOKEN} {USER_TOKEN_TEXT}, {ITEM_TOKEN} Heat (1995)" in with_user.text
    assert with_user.item_ids == (USER_ITEM_ID, *plain.item_ids)
    assert with_user.text.count(ITEM_TOKEN) == plain.text.count(ITEM_TOKEN) + 1
    text_only = build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, user_token=True)
    assert text_only == build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0)


def test_prompt_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="needs the history item ids"):
        build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0, hybrid=True, candidate_ids=CANDIDATE_IDS)
    with pytest.raises(ValueError, match="2 history ids for 3"):
        hybrid_prompt(ids=[1, 2])
    with pytest.raises(ValueError, match="contains the placeholder"):
        build_next_item_prompt([f"Evil {ITEM_TOKEN}"], CANDIDATES, "movie", 0)
    with pytest.raises(ValueError, match="template_index 3 out of range"):
        build_next_item_prompt(HISTORY, CANDIDATES, "movie", 3)


def test_ctr_prompt_has_profile_rated_history_and_target() -> None:
    prompt = build_ctr_prompt(
        ["Heat", "Fargo", "Alien"],
        "Babe",
        "movie",
        history_ratings=[4.0, math.nan, 3.5],
        profile={"gender": "M", "age": 24, "occupation": math.nan, "zip_code": "12345"},
    )
    assert prompt.text == (
        "The user is a man. The user is 24 years old. The user watched the following movies in order in the past, "
        "and rated them: 1. Heat (4 stars), 2. Fargo, 3. Alien (3.5 stars). The more stars the user gave a movie, "
        "the more the user liked it. Based on the movies the user has watched, deduce if the user will like the "
        "movie ***Babe***. You should ONLY tell me yes or no."
    )
    assert prompt.item_ids == ()
    assert ctr_answer(1, "movie") == "Yes." and ctr_answer(0, "movie") == "No."


def test_ctr_prompt_without_ratings_profile_or_history() -> None:
    unrated = build_ctr_prompt(["Heat"], "Babe", "movie", history_ratings=[math.nan])
    assert unrated.text.startswith(
        "The user watched the following movies in order in the past: 1. Heat. Based"
    )
    empty = build_ctr_prompt([], "Babe", "movie")
    assert empty.text.startswith("The user has not watched any movies before. Based on")


def test_hybrid_ctr_prompt_marks_history_and_target() -> None:
    prompt = build_ctr_prompt(
        ["Heat", "Fargo"], "Babe", "movie", hybrid=True, history_ids=[3, 5], target_id=8
    )
    assert f"1. Heat {ITEM_TOKEN}, 2. Fargo {ITEM_TOKEN}" in prompt.text
    assert f"***Babe {ITEM_TOKEN}***" in prompt.text
    assert prompt.item_ids == (3, 5, 8)
    with pytest.raises(ValueError, match="target_id"):
        build_ctr_prompt(["Heat"], "Babe", "movie", hybrid=True, history_ids=[3])


# --- tokenization -------------------------------------------------------------------------------------------------


def test_labels_cover_only_the_answer_and_its_newline_without_a_chat_template() -> None:
    tokenizer = byte_tokenizer(chat=False)
    encoder = ItemTokenizer(tokenizer)
    assert not encoder.uses_chat_template
    prompts = [build_next_item_prompt(HISTORY, CANDIDATES, "movie", 0), Prompt("Short prompt. Answer:")]
    batch = encoder.encode(prompts, ["Babe (1995)", "Casino (1995)"])
    assert batch.padding_side == "right" and batch.labels is not None
    for row, (prompt, answer) in enumerate(zip(prompts, ["Babe (1995)", "Casino (1995)"], strict=True)):
        length = int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, :length].all()  # right padding: real tokens first
        assert tokenizer.decode(batch.input_ids[row, :length]) == prompt.text + f" {answer}\n"
        answer_ids = labelled(batch.labels, row)
        assert tokenizer.decode(answer_ids) == f" {answer}\n"
        # labelled positions are exactly the last tokens of the row
        assert batch.labels[row, length - len(answer_ids) : length].tolist() == answer_ids
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()
    assert batch.item_positions.shape == (0, 2) and batch.item_ids.numel() == 0


def test_chat_template_is_applied_and_labels_end_with_the_end_of_turn() -> None:
    tokenizer = byte_tokenizer(chat=True)
    encoder = ItemTokenizer(tokenizer, system_prompt="You recommend movies.")
    assert encoder.uses_chat_template
    prompt = hybrid_prompt()
    batch = encoder.encode([prompt], ["Babe (1995)"])
    assert batch.labels is not None
    expected_prompt = (
        "<|im_start|>system\nYou recommend movies.<|im_end|>\n"
        f"<|im_start|>user\n{prompt.text}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(batch.input_ids[0]) == expected_prompt + "Babe (1995)<|im_end|>"
    assert tokenizer.decode(labelled(batch.labels, 0)) == "Babe (1995)<|im_end|>"
    # the generation prompt is exactly the training prompt
    generation = encoder.encode([prompt])
    assert generation.labels is None
    n_prompt = generation.input_ids.shape[1]
    assert torch.equal(generation.input_ids[0], batch.input_ids[0, :n_prompt])
    assert (batch.labels[0, :n_prompt] == IGNORE_INDEX).all()
    assert encoder.answer_token_ids("Yes.")[0] == tokenizer.convert_tokens_to_ids("Y")


@pytest.mark.parametrize("side", ["left", "right"])
def test_placeholder_positions_map_to_their_items_in_order(side: Literal["left", "right"]) -> None:
    tokenizer = byte_tokenizer(chat=True)
    encoder = ItemTokenizer(tokenizer)
    prompts = [hybrid_prompt(), hybrid_prompt(["Up"], [11]), Prompt("no items here")]
    batch = encoder.encode(prompts, ["Babe", "Casino", "Heat"], padding_side=side)
    rows, cols = batch.item_positions.unbind(1)
    assert (batch.input_ids[rows, cols] == encoder.item_token_id).all()
    assert (batch.input_ids == encoder.item_token_id).sum() == len(batch.item_ids)
    assert rows.tolist() == [0] * 5 + [1] * 3
    assert batch.item_ids.tolist() == [4, 7, 1, 9, 2, 11, 9, 2]
    assert (cols[:5].diff() > 0).all() and (cols[5:].diff() > 0).all()
    # each placeholder follows the title of the item it stands for
    titles = [*HISTORY, *CANDIDATES, "Up", *CANDIDATES]
    for r, c, title in zip(rows.tolist(), cols.tolist(), titles, strict=True):
        assert tokenizer.decode(batch.input_ids[r, :c], skip_special_tokens=False).endswith(f"{title} ")
    if side == "left":
        assert batch.attention_mask[:, -1].all()
    else:
        assert batch.attention_mask[:, 0].all()


def test_a_template_without_an_end_of_turn_token_keeps_its_closing_newline() -> None:
    tokenizer = byte_tokenizer(chat=False)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    encoder = ItemTokenizer(tokenizer)
    batch = encoder.encode(["Pick one."], ["Heat"])
    assert batch.labels is not None
    assert tokenizer.decode(batch.input_ids[0]) == "user: Pick one.\nassistant: Heat\n"
    assert tokenizer.decode(labelled(batch.labels, 0)) == "Heat\n"


def test_generation_prompts_are_left_padded_by_default() -> None:
    encoder = ItemTokenizer(byte_tokenizer(chat=True))
    batch = encoder.encode([Prompt("a"), Prompt("a much longer prompt")])
    assert batch.padding_side == "left" and batch.labels is None
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    right = encoder.encode([Prompt("a"), Prompt("a much longer prompt")], padding_side="right")
    assert right.attention_mask[0, -1] == 0


def test_placeholder_count_and_length_are_checked() -> None:
    encoder = ItemTokenizer(byte_tokenizer(chat=False), max_length=40)
    with pytest.raises(ValueError, match="1 <\\|item\\|> tokens in the text but 0 item ids"):
        encoder.encode([Prompt(f"Heat {ITEM_TOKEN}")], ["x"])
    with pytest.raises(ValueError, match="over max_length=40"):
        encoder.encode([Prompt("x" * 50)], ["y"])


def test_encoded_hybrid_batch_trains_a_tiny_llama() -> None:
    """End to end: encode, resize the embeddings for the new token, inject, forward, backward."""
    tokenizer = byte_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer))
    encoder = ItemTokenizer(tokenizer, model=model)
    assert model.get_input_embeddings().weight.shape[0] == encoder.item_token_id + 1
    batch = encoder.encode([hybrid_prompt(), hybrid_prompt(["Up"], [11])], ["Babe (1995)", "Casino (1995)"])
    item_table = torch.randn(12, 8, requires_grad=True)
    projector = ItemProjector(8, 32)
    embeds = embed_with_items(
        model.get_input_embeddings(),
        batch.input_ids,
        batch.item_positions,
        batch.item_ids,
        item_table,
        projector,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert item_table.grad is None


# --- the real SmolLM2 tokenizer -----------------------------------------------------------------------------------


def test_real_smollm2_tokenizer_applies_its_chat_template_and_labels_the_answer() -> None:
    tokenizer = load_backbone("smollm2-135m").tokenizer  # converts once if the cache is empty, else ~1 s
    encoder = ItemTokenizer(tokenizer)
    assert encoder.uses_chat_template
    prompt = hybrid_prompt()
    batch = encoder.encode([prompt, Prompt("Hi")], ["Babe (1995)", "No."])
    assert batch.labels is not None
    text = tokenizer.decode(batch.input_ids[0])
    assert text.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{prompt.text}<|im_end|>" in text
    assert tokenizer.decode(labelled(batch.labels, 0)) == "Babe (1995)<|im_end|>"
    assert tokenizer.decode(labelled(batch.labels, 1)) == "No.<|im_end|>"
    assert batch.item_ids.tolist() == list(prompt.item_ids)
    rows, cols = batch.item_positions.unbind(1)
    assert (batch.input_ids[rows, cols] == encoder.item_token_id).all()
    assert encoder.item_token_id == len(tokenizer) - 1


def test_items_are_described_with_their_tags_as_the_domain_writes_them(tmp_path: Path) -> None:
    assert describe_item("Morcheeba", ["trip-hop", "chillout"], "artist") == "Morcheeba (trip-hop, chillout)"
    assert describe_item("Morcheeba", [], "artist") == "Morcheeba"

    def custom(data: dict[str, Any]) -> None:
        data["item_described"] = "{title} [{tags}]"
        data["tag_separator"] = "/"

    _write_templates(tmp_path, custom)
    movie = load_templates("movie", directory=tmp_path)
    assert describe_item("Heat", ["Action", "Crime"], movie) == "Heat [Action/Crime]"

    def missing_tags(data: dict[str, Any]) -> None:
        data["item_described"] = "{title}"

    path = _write_templates(tmp_path, missing_tags)
    with pytest.raises(ConfigError, match="item_described.*{tags}") as caught:
        load_templates("movie", directory=tmp_path)
    assert str(path) in str(caught.value)
