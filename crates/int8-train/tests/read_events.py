"""Reads a run folder's TensorBoard events with TensorBoard's own reader (EventAccumulator) and
prints every tag with its (step, value) points as JSON, for the trainer's integration tests."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "histograms": {t: [[e.step, e.histogram_value.num] for e in acc.Histograms(t)] for t in tags["histograms"]},
    "tensors": {t: [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(t)] for t in tags["tensors"]},
}))
