"""The messages every PagedFleet component exchanges: one versioned pydantic model per message.

The scheduler half and the worker half of the engine talk only through these, in-process (the offline
engine passes the objects) or over Redis Streams (the fleet sends their JSON). Never pickle.
"""

from protocol.sampling import SamplingParams
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
    "ScheduledSequence",
    "SequenceOutput",
    "SequenceOutputDelta",
    "StepPlan",
    "StepResult",
    "TokenLogprob",
    "WorkerInfo",
]
