"""The worker's structured-output step (gpu_worker/structured_output.py, model_io/grammar.py) and the
sampler's logit_bias: a constrained row can only draw what its grammar allows, a finished grammar only
EOS, unconstrained rows of the same batch are untouched, and fork copies advance on their own."""

import json

import pytest
import torch

from gpu_worker.sampler import Sampler, SampleRequest
from gpu_worker.structured_output import GrammarStep
from model_io.grammar import GrammarCompiler
from protocol import SamplingParams, StructuredOutput

EOS = 2


@pytest.fixture(scope="module")
def compiler(smollm2_files):
    return GrammarCompiler.for_model(smollm2_files.path, 49152, [EOS])


@pytest.fixture(scope="module")
def tok(smollm2_files):
    from model_io.tokenizer import Tokenizer

    return Tokenizer(smollm2_files.path)


def test_choice_masks_its_rows_only_and_ends_with_eos(compiler, tok):
    so = StructuredOutput(kind="choice", spec=json.dumps(["yes", "no"]))
    g = compiler.new_sequence(so)
    sampler = Sampler(49152, [EOS])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, structured_output=so)]
    gen = torch.Generator().manual_seed(0)
    out = []
    for pos in range(4):
        logits = torch.randn(2, 49152, generator=gen)
        free_best = int(logits[0].argmax())
        step = GrammarStep([1], [g], [EOS])
        res = sampler.sample(logits, [SampleRequest(p, 0, 0, pos) for p in params], grammar=step)
        step.advance(res.token_ids)
        assert res.token_ids[0] == free_best  # the unconstrained row is untouched
        out.append(res.token_ids[1])
        if out[-1] == EOS:
            break
    assert out[-1] == EOS and tok.decode(out[:-1]) in ("yes", "no")


def test_copies_advance_independently_and_bad_specs_report(compiler, tok):
    g = compiler.new_sequence(StructuredOutput(kind="regex", spec="(ab|cd)"))
    ab, cd = tok.encode("ab", add_special_tokens=False), tok.encode("cd", add_special_tokens=False)
    child = g.copy()
    assert g.matcher().consume_tokens(ab) and child.matcher().consume_tokens(cd)
    assert compiler.check(StructuredOutput(kind="regex", spec="[0-9")) is not None
    assert compiler.check(StructuredOutput.of_json_schema({"type": "object"})) is None
    failed = compiler.new_sequence(StructuredOutput(kind="regex", spec="(unclosed"))
    logits = torch.zeros(1, 49152)
    GrammarStep([0], [failed], [EOS]).mask(logits)
    assert (logits[0] > -1e30).nonzero()[:, 0].tolist() == [EOS]  # a failed compile can only end


def test_logit_bias_moves_the_greedy_token():
    sampler = Sampler(100, [EOS])
    logits = torch.zeros(2, 100)
    logits[:, 5] = 1.0
    reqs = [SampleRequest(SamplingParams(temperature=0, logit_bias={7: 2.0}), 0, 0, 0),
            SampleRequest(SamplingParams(temperature=0), 0, 0, 0)]
    assert sampler.sample(logits, reqs).token_ids == [7, 5]


def test_pipelined_engine_masks_greedy_rows_on_the_device_with_the_synchronous_tokens(monkeypatch):
    """Greedy constrained steps launch ahead too (gpu_worker/launched_step.py): each grammar consumes its
    token when the next step's masks are filled. The pipelined engine gives the synchronous tokens, and
    the JSON parses."""
    from model_io.grammar import SeqGrammar
    from pagedfleet.engine import LLMEngine

    fed = []
    feed_later = SeqGrammar.feed_later
    monkeypatch.setattr(SeqGrammar, "feed_later", lambda g, src, j: (fed.append(j), feed_later(g, src, j))[1])
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reqs = [("A person as JSON:", SamplingParams(temperature=0, max_tokens=40,
                                                 structured_output=StructuredOutput.of_json_schema(schema))),
            ("Pick a colour:", SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutput(
                kind="choice", spec=json.dumps(["red", "green", "blue"])))),
            ("Count to ten:", SamplingParams(temperature=0, max_tokens=12))]

    def run(pipeline: bool):
        eng = LLMEngine(pipeline=pipeline, max_num_seqs=8)
        ids = [eng.add_request(p, sp) for p, sp in reqs]
        outs = {o.request_id: o.outputs[0] for o in eng.run_to_completion()}
        return [(outs[i].token_ids, outs[i].text) for i in ids]

    sync = run(False)
    fed.clear()
    ahead = run(True)
    assert ahead == sync
    assert len(fed) > 10  # the constrained steps left their tokens on the device
    assert set(json.loads(sync[0][1])) == {"name", "age"}
    assert sync[1][1] in ("red", "green", "blue")


def test_bitmask_apply_masks_exactly_the_zero_bits():
    """Our batched bitmask applier (no torch.compile on the step loop) masks exactly the tokens whose bit is 0."""
    import llguidance.torch as lt

    from gpu_worker.structured_output import apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    V = 1000
    bitmask = torch.randint(-2**31, 2**31 - 1, lt.get_bitmask_shape(3, V), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(3, V, generator=gen)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask(ours, bitmask)
    for r in range(3):  # the reference, bit by bit
        for t in range(V):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                theirs[r, t] = float("-inf")
    assert torch.equal(ours, theirs)
    assert torch.isinf(ours).any() and not torch.isinf(ours).all()
