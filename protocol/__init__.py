"""The messages every PagedFleet component exchanges, versioned.

The hot-path messages (StepPlan, StepResult, the output deltas and what they contain) are msgspec Structs
(protocol/wire.py: built without validation, validated on decode); the messages sent once per worker or
request, and SamplingParams (user input), are pydantic models validated when built. The scheduler half and
the worker half of the engine talk only through these, in-process (the offline engine passes the objects)
or over Redis Streams (the fleet sends their JSON). Never pickle.
"""

from protocol.sampling import SamplingParams, StructuredOutput
from protocol.messages import (
    PROTOCOL_VERSION,
    FinishReason,
    ForkSequence,
    GenerationRequest,
    NewSequence,
    RequestOutputDelta,
    ScheduledSequence,
    SequenceOutput,
    SequenceOutputDelta,
    StepPlan,
    StepResult,
    TokenLogprob,
    WorkerInfo,
)

__all__ = [
    "PROTOCOL_VERSION",
    "FinishReason",
    "ForkSequence",
    "GenerationRequest",
    "NewSequence",
    "RequestOutputDelta",
    "SamplingParams",
    "StructuredOutput",
    "ScheduledSequence",
    "SequenceOutput",
    "SequenceOutputDelta",
    "StepPlan",
    "StepResult",
    "TokenLogprob",
    "WorkerInfo",
]
