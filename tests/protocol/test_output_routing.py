"""The server's side of task output: an ``Output`` frame from a node reaches only the
owner of the chunk's job, stamped with the node's name and ahead of its result, only for
a chunk that node holds, and within the node's byte budget."""

from __future__ import annotations

from test_server_protocol import Net, _two_jobs_on_two_nodes

from achilles.protocol import messages as m
from achilles.server.router import OUTPUT_BURST, OUTPUT_RATE

TEXT = b'[["out", "hello\\n"]]'


def test_output_goes_to_the_jobs_owner_only_named_and_before_its_result() -> None:
    """A node's output for a chunk it runs: forwarded to that job's controller with the
    node's name (whatever the node put there), before the result; the other controller
    gets nothing."""
    net = Net()
    s = _two_jobs_on_two_nodes(net)
    s["node_b"].send(m.Output(s["kb"], 0, "forged-name", 0), TEXT)
    s["node_b"].send(m.Result(s["kb"], 0, m.OK, 0.0), b"R")
    got = s["b"].messages(m.Output, m.Result)
    name = s["node_b"].proto.name
    assert name in ("n1", "n2")
    assert got == [m.Output("job-b", 0, name, 0), m.Result("job-b", 0, m.OK, 0.0)]
    assert s["b"].log[-2].payload == TEXT
    assert s["a"].messages(m.Output) == []


def test_output_for_a_chunk_the_node_does_not_hold_is_dropped() -> None:
    """Output claimed for another node's chunk, or an unknown job, reaches nobody, and
    the node stays connected (it may be a late one after a cancel)."""
    net = Net()
    s = _two_jobs_on_two_nodes(net)
    s["node_a"].send(m.Output(s["kb"], 0, "", 0), TEXT)
    s["node_a"].send(m.Output("no-such-job", 0, "", 0), TEXT)
    assert s["a"].messages(m.Output) == [] and s["b"].messages(m.Output) == []
    assert not s["node_a"].closed


def test_output_over_the_nodes_budget_is_dropped_and_counted() -> None:
    """Past the burst, output is dropped: the owner hears of the first drop at once (an
    empty Output with the count), then nothing, and the next output forwarded once the
    budget refills carries the count of the rest."""
    net = Net(max_payload=1 << 20)
    s = _two_jobs_on_two_nodes(net)
    node, ctl, key = s["node_b"], s["b"], s["kb"]
    piece = b'[["out", "' + b"x" * (200 * 1024) + b'"]]'
    sends = OUTPUT_BURST // len(piece) + 3  # the burst, then three dropped
    for _ in range(sends):
        node.send(m.Output(key, 0, "", 0), piece)
    frames = [f for f in ctl.received() if isinstance(f.msg, m.Output)]
    full = [f for f in frames if f.payload]
    notes = [f for f in frames if not f.payload]
    assert len(full) == OUTPUT_BURST // len(piece)
    assert len(notes) == 1 and notes[0].msg.dropped == len(piece)
    net.clock.advance(2 * len(piece) / OUTPUT_RATE)
    node.send(m.Output(key, 0, "", 5), TEXT)
    [later] = [f for f in ctl.received() if isinstance(f.msg, m.Output)]
    dropped = (sends - len(full)) * len(piece)
    assert later.payload == TEXT and later.msg.dropped == 5 + dropped - notes[0].msg.dropped


def test_oversized_output_is_a_protocol_error() -> None:
    """An Output payload over OUTPUT_MAX is refused from its header, and the node closed."""
    net = Net(max_payload=1 << 20)
    s = _two_jobs_on_two_nodes(net)
    s["node_b"].send(m.Output(s["kb"], 0, "", 0), b"x" * (m.OUTPUT_MAX + 1))
    assert s["node_b"].error().code == "payload-too-large"
    assert s["b"].messages(m.Output) == []
