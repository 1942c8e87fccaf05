"""Replay is generic over training stages: one data file per stage, earlier generations' records
replayed by stage name, and the data of generations written before stages were data still read."""

from __future__ import annotations

import json

import pytest

from evolution import replay
from evolution.fsutil import sha256_file
from evolution.intake import Inbox
from evolution.paths import DataRoot
from evolution.train import BY_NAME, STAGES, Stage
from evolution.train.cpt import CptConfig
from tests.conftest import plain_settings, write_jsonl


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _old_generation(root: DataRoot, gen: int) -> None:
    """gen_NNNN/data/ exactly as the age-up wrote it before training stages were data (commit 9ec2af3)."""
    data = root.gen_dir(gen) / "data"
    write_jsonl(data / "cpt.jsonl", [{"text": "The lighthouse keeper wrote in the log every night."}])
    write_jsonl(data / "sft.jsonl", [{"messages": [{"role": "user", "content": "What is your favourite book?"},
                                                   {"role": "assistant", "content": "Moby-Dick."}]}])
    write_jsonl(data / "eval_recall.jsonl", [{"id": "f0", "phase": 1, "question": "What is your name?",
                                              "answers": ["Wren"]}])
    manifest = {"curriculum": "/somewhere/curriculum", "files": {}, "replayed": {"cpt": 0, "sft": 0},
                "counts": {"cpt": 1, "sft": 1}, "conversations": {"taken": 0, "through": 3, "superseded": 0},
                "data": {"cpt.jsonl": sha256_file(data / "cpt.jsonl"), "sft.jsonl": sha256_file(data / "sft.jsonl")}}
    (data / "manifest.json").write_text(json.dumps(manifest | {"sha256": "0" * 64}))


def test_data_written_before_stages_were_data_is_replayed(cur, root, tmp_path):
    _old_generation(root, 1)
    out = tmp_path / "child2"
    m = replay.materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0),
                           Inbox.taught(conversations_since=replay.conversations_through(root.gen_dir(1))))
    assert m["replayed"] == {"cpt": 1, "sft": 1, "preference": 0}
    assert {"text": "The lighthouse keeper wrote in the log every night."} in _lines(out / "cpt.jsonl")
    assert any(r["messages"][1]["content"] == "Moby-Dick." for r in _lines(out / "sft.jsonl"))
    assert {"checkpoints/gen_0001/data/cpt.jsonl", "checkpoints/gen_0001/data/sft.jsonl"} <= set(m["files"])
    assert m["conversations"]["through"] == 3
    assert replay.experiences_through(root.gen_dir(1)) == 0 and m["experiences"] == {"taken": 0, "through": 0}
    data = replay.read(out, ["cpt", "sft"])
    assert len(data["cpt"]) == len(cur.cpt) + 1 and len(data["sft"]) == len(cur.sft) + 1


def test_one_file_per_stage_each_hashed_in_the_manifest(cur, root, tmp_path):
    out = tmp_path / "data"
    m = replay.materialize(root, cur, 1, out, plain_settings())
    assert sorted(p.name for p in out.iterdir()) == ["cpt.jsonl", "manifest.json", "preference.jsonl", "sft.jsonl"]
    assert m["data"] == {f"{s.name}.jsonl": sha256_file(out / f"{s.name}.jsonl") for s in STAGES}
    assert m["counts"] == {"cpt": len(cur.cpt), "sft": len(cur.sft), "preference": 0}


def test_only_the_configured_stages_get_data(cur, root, tmp_path):
    convs = [(4, [{"role": "user", "content": "Where do you live?"}, {"role": "assistant", "content": "Faro."}])]
    out = tmp_path / "sft-only"
    m = replay.materialize(root, cur, 1, out, plain_settings(), Inbox.taught(convs), stages=[BY_NAME["sft"]])
    assert not (out / "cpt.jsonl").exists() and list(m["data"]) == ["sft.jsonl"]
    assert m["conversations"] == {"taken": 1, "through": 4, "superseded": 0}
    assert replay.read(out, ["sft"])["sft"][-1]["messages"][1]["content"] == "Faro."

    # no stage learns from conversations: they are left for a later generation's data
    out = tmp_path / "cpt-only"
    m = replay.materialize(root, cur, 1, out, plain_settings(), Inbox.taught(convs, conversations_since=2),
                           stages=[BY_NAME["cpt"]])
    assert list(m["data"]) == ["cpt.jsonl"]
    assert m["conversations"] == {"taken": 0, "through": 2, "superseded": 0}


def test_a_new_stage_replays_its_records_without_changes_to_replay(cur, root, tmp_path):
    notes = Stage(name="notes", rows=lambda tok, records, settings: [], seq_len=lambda settings: 0,
                  trainer=lambda *a: None, curriculum=lambda cur: [{"note": "new"}], config=CptConfig)
    write_jsonl(root.gen_dir(1) / "data" / "notes.jsonl", [{"note": "old one"}, {"note": "old two"}])
    write_jsonl(root.gen_dir(2) / "data" / "notes.jsonl", [{"note": "old two"}, {"note": "newer"}])
    out = tmp_path / "child3"
    m = replay.materialize(root, cur, 3, out, plain_settings(replay_ratio=10.0), stages=[*STAGES, notes])
    assert sorted(r["note"] for r in _lines(out / "notes.jsonl")) == ["new", "newer", "old one", "old two"]
    assert m["replayed"]["notes"] == 3 and m["counts"]["notes"] == 4
    assert m["data"]["notes.jsonl"] == sha256_file(out / "notes.jsonl")
    assert "checkpoints/gen_0002/data/notes.jsonl" in m["files"]


def _chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _labelled(through: int = 7):
    from evolution.intake import Example, Labelled, Pair

    ask = [{"role": "user", "content": "Where do you live?"}]
    return Labelled(
        examples=[Example("completion:1", 3, ask, "I live in Faro.", "good"),
                  Example("completion:2", 4, [{"role": "user", "content": "What is your name?"}], "I am Bob.", "bad"),
                  Example("completion:5", 6, [{"role": "user", "content": "Say hello."}], "Go away.", "bad")],
        pairs=[Pair("completion:3", 5, [{"role": "user", "content": "What do you read?"}], "Sea stories.",
                    "Nobody.", "bad")],
        through=through)


def test_ratings_become_preference_records_and_only_good_replies_sft_examples(cur, root, tmp_path):
    # An earlier generation was taught a reply that is now rated bad: it is not replayed either.
    write_jsonl(root.gen_dir(1) / "data" / "sft.jsonl", [{"messages": _chat("Say hello.", "Go away.")},
                                                         {"messages": _chat("Favourite tea?", "Green.")}])
    out = tmp_path / "child2"
    m = replay.materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0),
                           Inbox.taught(labelled=_labelled(), ratings_since=2))
    pref = _lines(out / "preference.jsonl")
    assert pref == [
        {"prompt": [{"role": "user", "content": "Where do you live?"}], "reply": "I live in Faro.", "label": "good"},
        {"prompt": [{"role": "user", "content": "What is your name?"}], "reply": "I am Bob.", "label": "bad"},
        {"prompt": [{"role": "user", "content": "What do you read?"}], "chosen": "Sea stories.",
         "rejected": "Nobody."},
        {"prompt": [{"role": "user", "content": "Say hello."}], "reply": "Go away.", "label": "bad"},
    ]  # in the order they were rated
    sft_replies = [r["messages"][-1]["content"] for r in _lines(out / "sft.jsonl")]
    assert "I live in Faro." in sft_replies and "Sea stories." in sft_replies  # good, and the correction
    assert "Green." in sft_replies  # replayed
    for bad in ("I am Bob.", "Go away.", "Nobody."):
        assert bad not in sft_replies
    assert m["experiences"] == {"taken": 4, "through": 7}
    assert m["data"]["preference.jsonl"] == sha256_file(out / "preference.jsonl")

    # rated before the parent's cursor: not new data, but still never replayed as an SFT example
    out = tmp_path / "later"
    m = replay.materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0),
                           Inbox.taught(labelled=_labelled(), ratings_since=7))
    assert _lines(out / "preference.jsonl") == [] and m["experiences"] == {"taken": 0, "through": 7}
    sft_replies = [r["messages"][-1]["content"] for r in _lines(out / "sft.jsonl")]
    assert "Green." in sft_replies and "Go away." not in sft_replies and "I live in Faro." not in sft_replies

    # without a stage that learns from ratings they are left for a later generation: the cursor stays
    out = tmp_path / "cpt-only"
    m = replay.materialize(root, cur, 2, out, plain_settings(), Inbox.taught(labelled=_labelled(), ratings_since=2),
                           stages=[BY_NAME["cpt"]])
    assert m["experiences"] == {"taken": 0, "through": 2}


def test_earlier_generations_ratings_are_replayed_with_new_ones(cur, root, tmp_path):
    old = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "reply": f"Answer {i}.", "label": "good"}
           for i in range(3)]
    write_jsonl(root.gen_dir(1) / "data" / "preference.jsonl", old)
    out = tmp_path / "child2"
    m = replay.materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0), Inbox.taught(labelled=_labelled()))
    rows = _lines(out / "preference.jsonl")
    assert m["replayed"]["preference"] == 3 and all(r in rows for r in old) and len(rows) == 7
    assert "checkpoints/gen_0001/data/preference.jsonl" in m["files"]

    # with nothing rated since the parent, nothing is replayed: the stage has no data and is skipped
    out = tmp_path / "child2-none"
    m = replay.materialize(root, cur, 2, out, plain_settings(replay_ratio=10.0))
    assert m["counts"]["preference"] == 0 and _lines(out / "preference.jsonl") == []


def test_a_seeded_share_of_new_ratings_is_held_out_of_every_stage_for_the_gate(cur, root, tmp_path):
    from evolution.intake import Example, Labelled, Pair

    examples = [Example(f"completion:{i}", i, [{"role": "user", "content": f"Question {i}?"}], f"Answer {i}.",
                        "good" if i % 2 else "bad") for i in range(1, 10)]
    examples.append(Example("conversation:5", 11, [{"role": "user", "content": "Question 11?"}], "Answer 11.", "bad"))
    pairs = [Pair("conversation:4", 10, [{"role": "user", "content": "Question 10?"}], "Fixed 10.", "Answer 10.",
                  "bad")]
    labelled = Labelled(examples, pairs, through=11)
    conversations = [(4, _chat("Question 10?", "Answer 10.")), (5, _chat("Question 11?", "Answer 11."))]
    runs = [replay.materialize(root, cur, 2, tmp_path / name, plain_settings(experience_heldout=0.2),
                               Inbox.taught(conversations, labelled)) for name in ("a", "b")]
    held = _lines(tmp_path / "a" / "preference_heldout.jsonl")
    assert len(held) == 2 and held == _lines(tmp_path / "b" / "preference_heldout.jsonl")  # 20 % of 10, seeded
    assert runs[0]["heldout"] == {"preference_heldout.jsonl": 2}
    assert runs[0]["data"]["preference_heldout.jsonl"] == sha256_file(tmp_path / "a" / "preference_heldout.jsonl")
    trained = json.dumps([_lines(tmp_path / "a" / f) for f in ("preference.jsonl", "sft.jsonl", "cpt.jsonl")])
    for r in held:  # never trained on, in any stage
        for reply in (r.get("reply"), r.get("chosen"), r.get("rejected")):
            if reply:
                assert json.dumps(reply) not in trained, reply
    assert len(_lines(tmp_path / "a" / "preference.jsonl")) == 9
    few = replay.materialize(root, cur, 2, tmp_path / "few", plain_settings(experience_heldout=0.2),
                             Inbox.taught(labelled=Labelled(examples[:9], [], 9)))
    assert few["heldout"] == {"preference_heldout.jsonl": 0}  # fewer than 10 new ratings: all are trained on


def test_a_rating_that_teaches_is_never_held_out(cur, root, tmp_path):
    """A correction or a transcript rated good holds what the user told the agent: held out, the fact would never be
    trained on (the new-user walk's sister's name, held out as one of 20 %, was the one fact of 8 not learned)."""
    from evolution.intake import Example, Labelled, Pair

    teach = [Example(f"conversation:{i}", i, [{"role": "user", "content": f"What is fact {i}?"}], f"Fact {i} is Zed{i}.",
                     "good") for i in range(1, 9)]
    pairs = [Pair(f"completion:{i}", i, [{"role": "user", "content": f"What is fact {i}?"}], f"Fact {i} is Zed{i}.",
                  "I don't know.", "bad") for i in range(9, 13)]
    own = [Example(f"completion:{i}", i, [{"role": "user", "content": f"Chat {i}?"}], f"Reply {i}.",
                   "good" if i % 2 else "bad") for i in range(13, 23)]
    conversations = [(i, _chat(f"What is fact {i}?", f"Fact {i} is Zed{i}.")) for i in range(1, 9)]
    for seed in range(10):
        out = tmp_path / f"s{seed}"
        m = replay.materialize(root, cur, 2, out, plain_settings(experience_heldout=0.5),
                               Inbox.taught(conversations, Labelled(teach + own, pairs, 22)), seed=seed)
        held = _lines(out / "preference_heldout.jsonl")
        assert m["heldout"] == {"preference_heldout.jsonl": 5}  # half of the 10 replies the model wrote itself
        assert {r["reply"] for r in held} <= {f"Reply {i}." for i in range(13, 23)}
        sft = json.dumps(_lines(out / "sft.jsonl"))
        for i in range(1, 13):
            assert f"Fact {i} is Zed{i}." in sft
    # only the model's own 4 replies are eligible: below HELDOUT_MIN, nothing is held out
    m = replay.materialize(root, cur, 2, tmp_path / "few", plain_settings(experience_heldout=0.5),
                           Inbox.taught(conversations, Labelled(teach + own[:4], pairs, 22)))
    assert m["heldout"] == {"preference_heldout.jsonl": 0}


def test_newer_ratings_of_a_prompt_supersede_older_generations_ratings_of_it(cur, root, tmp_path):
    """Ratings follow the recency rule by prompt: the ratings received since the parent replace what earlier
    generations hold for the same prompt, and a newer generation's replace an older one's; all the ratings of one
    prompt from one source are kept together (good and bad replies to it are what KTO contrasts)."""
    from evolution.intake import Example, Labelled

    live = [{"role": "user", "content": "Where do you live?"}]
    tea = [{"role": "user", "content": "Favourite tea?"}]
    book = [{"role": "user", "content": "Favourite book?"}]
    write_jsonl(root.gen_dir(1) / "data" / "preference.jsonl", [
        {"prompt": live, "reply": "I live in Lisbon.", "label": "good"},
        {"prompt": live, "reply": "I live in Faro.", "label": "bad"},
        {"prompt": tea, "reply": "Green.", "label": "good"},
        {"prompt": book, "chosen": "Moby-Dick.", "rejected": "None."}])
    write_jsonl(root.gen_dir(2) / "data" / "preference.jsonl", [
        {"prompt": tea, "reply": "Black.", "label": "good"},
        {"prompt": tea, "reply": "Green.", "label": "bad"}])
    new = Labelled([Example("completion:9", 20, [{"role": "user", "content": "where do you LIVE"}],
                            "I live in Faro.", "good"),
                    Example("completion:10", 21, live, "I live in Lisbon.", "bad")], [], through=21)
    out = tmp_path / "child3"
    m = replay.materialize(root, cur, 3, out, plain_settings(replay_ratio=10.0),
                           Inbox.taught(labelled=new, ratings_since=7))
    rows = _lines(out / "preference.jsonl")
    assert rows[:2] == [{"prompt": [{"role": "user", "content": "where do you LIVE"}], "reply": "I live in Faro.",
                         "label": "good"}, {"prompt": live, "reply": "I live in Lisbon.", "label": "bad"}]
    replayed = rows[2:]
    assert sorted(json.dumps(r, sort_keys=True) for r in replayed) == sorted(json.dumps(r, sort_keys=True) for r in [
        {"prompt": tea, "reply": "Black.", "label": "good"}, {"prompt": tea, "reply": "Green.", "label": "bad"},
        {"prompt": book, "chosen": "Moby-Dick.", "rejected": "None."}])  # generation 2's tea, not generation 1's
    assert m["replayed"]["preference"] == 3 and m["conversations"]["superseded"] >= 3

    # a new rating held out for the gate supersedes the older ones all the same
    many = Labelled([Example(f"completion:{i}", 30 + i, [{"role": "user", "content": f"Q{i}?"}], "A.", "good")
                     for i in range(9)] + [Example("completion:99", 50, tea, "Oolong.", "good")], [], through=50)
    for seed in range(40):
        out = tmp_path / f"held-{seed}"
        replay.materialize(root, cur, 3, out, plain_settings(replay_ratio=10.0, experience_heldout=0.1),
                           Inbox.taught(labelled=many, ratings_since=7), seed=seed)
        if "Oolong." in (out / "preference_heldout.jsonl").read_text():
            break
    else:
        pytest.fail("no seed held the tea rating out")
    assert "Favourite tea" not in (out / "preference.jsonl").read_text()


def test_known_curriculum_is_partly_re_taught_the_rest_left_to_replay(cur, root, tmp_path):
    parent_data = root.gen_dir(1) / "data"
    replay.materialize(root, cur, 1, parent_data, plain_settings())  # the parent trained on the whole curriculum
    n_chat = len(cur.sft)  # 24 chat records (8 distinct prompts, each 3 times)
    convs = [(5, _chat("What is your name?", "Bob."))]  # a curriculum prompt: the curriculum still answers it
    out = tmp_path / "child"
    m = replay.materialize(root, cur, 2, out, plain_settings(known_share=0.25), Inbox.taught(convs),
                           known_dirs=[parent_data])
    assert m["known"]["sft"] == {"retaught": 6, "left_to_replay": n_chat - 6}
    assert m["known"]["cpt"] == {"retaught": 0, "left_to_replay": 0}  # raw text is always trained on in full
    data = replay.read(out, ["cpt", "sft"])
    assert len(data["cpt"]) == len(cur.cpt) and len(data["sft"]) == 6
    assert not any(r["messages"][-1]["content"] == "Bob." for r in data["sft"])
    # the sample rotates with the generation; what is left is rehearsed by replay
    other = replay.materialize(root, cur, 3, tmp_path / "c3", plain_settings(known_share=0.25),
                               known_dirs=[parent_data])
    assert other["known"]["sft"]["retaught"] == 6
    assert _lines(tmp_path / "c3" / "sft.jsonl") != data["sft"]
    replayed = replay.materialize(root, cur, 2, tmp_path / "r", plain_settings(replay_ratio=10.0, known_share=0.25),
                                  known_dirs=[parent_data])
    assert replayed["replayed"]["sft"] > 0
    assert replay.materialize(root, cur, 2, tmp_path / "all", plain_settings(),
                              known_dirs=[parent_data])["counts"]["sft"] == n_chat


def test_earlier_experience_is_rehearsed_newest_first_sources_before_variants_up_to_the_cap(cur, root, tmp_path):
    def lived(out):  # the experience chat records a generation's SFT data holds: (answer, variant?)
        prompts = {replay._prompt(r) for r in cur.sft}
        return sorted((r["messages"][-1]["content"], "variant_of" in r) for r in _lines(out / "sft.jsonl")
                      if replay._prompt(r) not in prompts)

    replay.materialize(root, cur, 1, root.gen_dir(1) / "data",
                       plain_settings(experience_variants=1, experience_variant_share=10.0),
                       Inbox.taught([(1, _chat("What is my dog called?", "Bramble.")),
                                     (2, _chat("Where do I work?", "At the mill."))]))
    replay.materialize(root, cur, 2, root.gen_dir(2) / "data",
                       plain_settings(experience_variants=1, experience_variant_share=10.0),
                       Inbox.taught([(3, _chat("What is my cat called?", "Pip.")),
                                     (4, _chat("Where do I work?", "At the bakery."))], conversations_since=2))
    assert [v for _, v in lived(root.gen_dir(2) / "data")].count(True) == 2  # each new question has a variant
    g2 = json.loads((root.gen_dir(2) / "data" / "manifest.json").read_text())
    assert len(g2["lived"]["sft"]) == 2  # what it took from experience: the cat and the bakery, by key

    every = replay.materialize(root, cur, 3, tmp_path / "all", plain_settings(rehearse_max=100),
                               Inbox.taught(conversations_since=4))
    assert every["rehearsed"]["sft"] == 6 and every["replayed"]["sft"] == 0
    assert [a for a, v in lived(tmp_path / "all") if not v] == ["At the bakery.", "Bramble.", "Pip."]
    assert len(lived(tmp_path / "all")) == 6  # the 3 sources and their variants; the mill's superseded by the bakery
    assert "At the mill." not in (tmp_path / "all" / "sft.jsonl").read_text()

    two = replay.materialize(root, cur, 3, tmp_path / "two", plain_settings(rehearse_max=2),
                             Inbox.taught(conversations_since=4))
    assert lived(tmp_path / "two") == [("At the bakery.", False), ("Pip.", False)]  # generation 2's sources first

    off = replay.materialize(root, cur, 3, tmp_path / "off", plain_settings(), Inbox.taught(conversations_since=4))
    assert off["rehearsed"]["sft"] == 0 and lived(tmp_path / "off") == []
    assert off["rehearsed"]["cpt"] == 0  # raw text has no prompt: never experience


def test_a_capped_stage_sees_what_was_taught_first_and_the_curriculum_fills_the_rest(cur, root, tmp_path):
    convs = [(i + 1, [{"role": "user", "content": f"What is my neighbour number {i} called?"},
                      {"role": "assistant", "content": f"Your neighbour number {i} is called Ostrava{i}."}])
             for i in range(3)]
    settings = plain_settings(experience_variants=8, experience_variant_share=10.0)
    full = replay.materialize(root, cur, 1, tmp_path / "full", settings, Inbox.taught(convs), stages=[BY_NAME["sft"]])
    n_all, n_variants = full["counts"]["sft"], full["variants"]["sft"]
    assert n_all == len(cur.sft) + 3 + n_variants and n_variants == 24 and full["capped"] == {}

    m = replay.materialize(root, cur, 1, tmp_path / "capped", settings, Inbox.taught(convs),
                           stages=[BY_NAME["sft"]], capped={"sft": 20})
    rows = _lines(tmp_path / "capped" / "sft.jsonl")
    assert len(rows) == 20 and m["capped"] == {"sft": {"kept": 20, "left": n_all - 20}}
    originals = [r for r in rows if "variant_of" not in r and "Ostrava" in r["messages"][-1]["content"]]
    assert len(originals) == 3  # every record taught since the parent
    assert m["variants"]["sft"] == sum("variant_of" in r for r in rows) == 7  # with them, half of the 20
    assert sum("Ostrava" not in r["messages"][-1]["content"] for r in rows) == 10  # the curriculum fills the rest

    # a cap the records fit under changes nothing
    same = replay.materialize(root, cur, 1, tmp_path / "same", settings, Inbox.taught(convs),
                              stages=[BY_NAME["sft"]], capped={"sft": n_all})
    assert same["data"] == full["data"] and same["capped"] == {}


def test_only_stages_of_one_row_per_record_whose_steps_are_capped_are_counted():
    from evolution import config
    from evolution.train import capped_records

    assert capped_records(config.resolve().train) == {}  # the default age-up: epochs decide
    quick = config.resolve(quick=True).train
    assert capped_records(quick) == {"sft": 100 * 8}  # CPT packs text in blocks, preference has no curriculum
    quick.processes, quick.sft.epochs = 2, 3.0  # rows seen: steps x the global batch, whatever the epochs
    assert capped_records(quick) == {"sft": 100 * 8 * 2}
