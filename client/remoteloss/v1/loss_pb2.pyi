from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_NONE: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]
    REDUCTION_BATCHMEAN: _ClassVar[Reduction]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_NONE: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_SUM: Reduction
REDUCTION_BATCHMEAN: Reduction

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "requires_grad")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    requires_grad: bool
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., requires_grad: _Optional[bool] = ...) -> None: ...

class L1Loss(_message.Message):
    __slots__ = ("input", "target", "weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class MseLoss(_message.Message):
    __slots__ = ("input", "target", "weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class CrossEntropy(_message.Message):
    __slots__ = ("input", "target", "weight", "ignore_index", "reduction", "label_smoothing", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    ignore_index: int
    reduction: Reduction
    label_smoothing: float
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., ignore_index: _Optional[int] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., label_smoothing: _Optional[float] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class CtcLoss(_message.Message):
    __slots__ = ("log_probs", "targets", "input_lengths", "target_lengths", "blank", "reduction", "zero_infinity")
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    INPUT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    BLANK_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    ZERO_INFINITY_FIELD_NUMBER: _ClassVar[int]
    log_probs: Tensor
    targets: Tensor
    input_lengths: Tensor
    target_lengths: Tensor
    blank: int
    reduction: Reduction
    zero_infinity: bool
    def __init__(self, log_probs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., input_lengths: _Optional[_Union[Tensor, _Mapping]] = ..., target_lengths: _Optional[_Union[Tensor, _Mapping]] = ..., blank: _Optional[int] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., zero_infinity: _Optional[bool] = ...) -> None: ...

class NllLoss(_message.Message):
    __slots__ = ("input", "target", "weight", "ignore_index", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    ignore_index: int
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., ignore_index: _Optional[int] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class PoissonNllLoss(_message.Message):
    __slots__ = ("input", "target", "log_input", "full", "eps", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LOG_INPUT_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    log_input: bool
    full: bool
    eps: float
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., log_input: _Optional[bool] = ..., full: _Optional[bool] = ..., eps: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class GaussianNllLoss(_message.Message):
    __slots__ = ("input", "target", "var", "var_float", "full", "eps", "reduction")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    VAR_FLOAT_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    var: Tensor
    var_float: float
    full: bool
    eps: float
    reduction: Reduction
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., var: _Optional[_Union[Tensor, _Mapping]] = ..., var_float: _Optional[float] = ..., full: _Optional[bool] = ..., eps: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ...) -> None: ...

class KlDiv(_message.Message):
    __slots__ = ("input", "target", "reduction", "log_target", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    LOG_TARGET_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    reduction: Reduction
    log_target: bool
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., log_target: _Optional[bool] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class BinaryCrossEntropy(_message.Message):
    __slots__ = ("input", "target", "weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class BinaryCrossEntropyWithLogits(_message.Message):
    __slots__ = ("input", "target", "weight", "pos_weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    POS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    pos_weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., pos_weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class MarginRankingLoss(_message.Message):
    __slots__ = ("input1", "input2", "target", "margin", "reduction", "size_average", "reduce")
    INPUT1_FIELD_NUMBER: _ClassVar[int]
    INPUT2_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input1: Tensor
    input2: Tensor
    target: Tensor
    margin: float
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input1: _Optional[_Union[Tensor, _Mapping]] = ..., input2: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class HingeEmbeddingLoss(_message.Message):
    __slots__ = ("input", "target", "margin", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    margin: float
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class MultilabelMarginLoss(_message.Message):
    __slots__ = ("input", "target", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class HuberLoss(_message.Message):
    __slots__ = ("input", "target", "weight", "reduction", "delta")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    reduction: Reduction
    delta: float
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., delta: _Optional[float] = ...) -> None: ...

class SmoothL1Loss(_message.Message):
    __slots__ = ("input", "target", "reduction", "beta", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    reduction: Reduction
    beta: float
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., beta: _Optional[float] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class SoftMarginLoss(_message.Message):
    __slots__ = ("input", "target", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class MultilabelSoftMarginLoss(_message.Message):
    __slots__ = ("input", "target", "weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class CosineEmbeddingLoss(_message.Message):
    __slots__ = ("input1", "input2", "target", "margin", "reduction", "size_average", "reduce")
    INPUT1_FIELD_NUMBER: _ClassVar[int]
    INPUT2_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input1: Tensor
    input2: Tensor
    target: Tensor
    margin: float
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input1: _Optional[_Union[Tensor, _Mapping]] = ..., input2: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class MultiMarginLoss(_message.Message):
    __slots__ = ("input", "target", "p", "margin", "weight", "reduction", "size_average", "reduce")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    p: int
    margin: float
    weight: Tensor
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., p: _Optional[int] = ..., margin: _Optional[float] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class TripletMarginLoss(_message.Message):
    __slots__ = ("anchor", "positive", "negative", "margin", "p", "eps", "swap", "reduction", "size_average", "reduce")
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    REDUCE_FIELD_NUMBER: _ClassVar[int]
    anchor: Tensor
    positive: Tensor
    negative: Tensor
    margin: float
    p: float
    eps: float
    swap: bool
    reduction: Reduction
    size_average: bool
    reduce: bool
    def __init__(self, anchor: _Optional[_Union[Tensor, _Mapping]] = ..., positive: _Optional[_Union[Tensor, _Mapping]] = ..., negative: _Optional[_Union[Tensor, _Mapping]] = ..., margin: _Optional[float] = ..., p: _Optional[float] = ..., eps: _Optional[float] = ..., swap: _Optional[bool] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., size_average: _Optional[bool] = ..., reduce: _Optional[bool] = ...) -> None: ...

class PairwiseDistance(_message.Message):
    __slots__ = ("p", "eps", "keepdim")
    P_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    KEEPDIM_FIELD_NUMBER: _ClassVar[int]
    p: float
    eps: float
    keepdim: bool
    def __init__(self, p: _Optional[float] = ..., eps: _Optional[float] = ..., keepdim: _Optional[bool] = ...) -> None: ...

class CosineDistance(_message.Message):
    __slots__ = ("dim", "eps")
    DIM_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    eps: float
    def __init__(self, dim: _Optional[int] = ..., eps: _Optional[float] = ...) -> None: ...

class DistanceFunction(_message.Message):
    __slots__ = ("pairwise_distance", "cosine_distance")
    PAIRWISE_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    COSINE_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    pairwise_distance: PairwiseDistance
    cosine_distance: CosineDistance
    def __init__(self, pairwise_distance: _Optional[_Union[PairwiseDistance, _Mapping]] = ..., cosine_distance: _Optional[_Union[CosineDistance, _Mapping]] = ...) -> None: ...

class TripletMarginWithDistanceLoss(_message.Message):
    __slots__ = ("anchor", "positive", "negative", "distance_function", "margin", "swap", "reduction")
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    anchor: Tensor
    positive: Tensor
    negative: Tensor
    distance_function: DistanceFunction
    margin: float
    swap: bool
    reduction: Reduction
    def __init__(self, anchor: _Optional[_Union[Tensor, _Mapping]] = ..., positive: _Optional[_Union[Tensor, _Mapping]] = ..., negative: _Optional[_Union[Tensor, _Mapping]] = ..., distance_function: _Optional[_Union[DistanceFunction, _Mapping]] = ..., margin: _Optional[float] = ..., swap: _Optional[bool] = ..., reduction: _Optional[_Union[Reduction, str]] = ...) -> None: ...

class LinearCrossEntropyOptions(_message.Message):
    __slots__ = ("allow_retain_graph", "batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype")
    ALLOW_RETAIN_GRAPH_FIELD_NUMBER: _ClassVar[int]
    BATCH_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_METHOD_FIELD_NUMBER: _ClassVar[int]
    ACC_POLICY_FIELD_NUMBER: _ClassVar[int]
    ACC_DTYPE_FIELD_NUMBER: _ClassVar[int]
    allow_retain_graph: bool
    batch_chunk_size: int
    chunking_method: str
    acc_policy: str
    acc_dtype: DType
    def __init__(self, allow_retain_graph: _Optional[bool] = ..., batch_chunk_size: _Optional[int] = ..., chunking_method: _Optional[str] = ..., acc_policy: _Optional[str] = ..., acc_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LinearCrossEntropy(_message.Message):
    __slots__ = ("input", "linear_weight", "target", "linear_bias", "weight", "reduction", "ignore_index", "label_smoothing", "options")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LINEAR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LINEAR_BIAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    IGNORE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    linear_weight: Tensor
    target: Tensor
    linear_bias: Tensor
    weight: Tensor
    reduction: Reduction
    ignore_index: int
    label_smoothing: float
    options: LinearCrossEntropyOptions
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., linear_weight: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., linear_bias: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., ignore_index: _Optional[int] = ..., label_smoothing: _Optional[float] = ..., options: _Optional[_Union[LinearCrossEntropyOptions, _Mapping]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("l1_loss", "mse_loss", "cross_entropy", "ctc_loss", "nll_loss", "poisson_nll_loss", "gaussian_nll_loss", "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits", "margin_ranking_loss", "hinge_embedding_loss", "multilabel_margin_loss", "huber_loss", "smooth_l1_loss", "soft_margin_loss", "multilabel_soft_margin_loss", "cosine_embedding_loss", "multi_margin_loss", "triplet_margin_loss", "triplet_margin_with_distance_loss", "linear_cross_entropy", "grad_output")
    L1_LOSS_FIELD_NUMBER: _ClassVar[int]
    MSE_LOSS_FIELD_NUMBER: _ClassVar[int]
    CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    CTC_LOSS_FIELD_NUMBER: _ClassVar[int]
    NLL_LOSS_FIELD_NUMBER: _ClassVar[int]
    POISSON_NLL_LOSS_FIELD_NUMBER: _ClassVar[int]
    GAUSSIAN_NLL_LOSS_FIELD_NUMBER: _ClassVar[int]
    KL_DIV_FIELD_NUMBER: _ClassVar[int]
    BINARY_CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    BINARY_CROSS_ENTROPY_WITH_LOGITS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_RANKING_LOSS_FIELD_NUMBER: _ClassVar[int]
    HINGE_EMBEDDING_LOSS_FIELD_NUMBER: _ClassVar[int]
    MULTILABEL_MARGIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HUBER_LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTH_L1_LOSS_FIELD_NUMBER: _ClassVar[int]
    SOFT_MARGIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    MULTILABEL_SOFT_MARGIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    COSINE_EMBEDDING_LOSS_FIELD_NUMBER: _ClassVar[int]
    MULTI_MARGIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRIPLET_MARGIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRIPLET_MARGIN_WITH_DISTANCE_LOSS_FIELD_NUMBER: _ClassVar[int]
    LINEAR_CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    l1_loss: L1Loss
    mse_loss: MseLoss
    cross_entropy: CrossEntropy
    ctc_loss: CtcLoss
    nll_loss: NllLoss
    poisson_nll_loss: PoissonNllLoss
    gaussian_nll_loss: GaussianNllLoss
    kl_div: KlDiv
    binary_cross_entropy: BinaryCrossEntropy
    binary_cross_entropy_with_logits: BinaryCrossEntropyWithLogits
    margin_ranking_loss: MarginRankingLoss
    hinge_embedding_loss: HingeEmbeddingLoss
    multilabel_margin_loss: MultilabelMarginLoss
    huber_loss: HuberLoss
    smooth_l1_loss: SmoothL1Loss
    soft_margin_loss: SoftMarginLoss
    multilabel_soft_margin_loss: MultilabelSoftMarginLoss
    cosine_embedding_loss: CosineEmbeddingLoss
    multi_margin_loss: MultiMarginLoss
    triplet_margin_loss: TripletMarginLoss
    triplet_margin_with_distance_loss: TripletMarginWithDistanceLoss
    linear_cross_entropy: LinearCrossEntropy
    grad_output: Tensor
    def __init__(self, l1_loss: _Optional[_Union[L1Loss, _Mapping]] = ..., mse_loss: _Optional[_Union[MseLoss, _Mapping]] = ..., cross_entropy: _Optional[_Union[CrossEntropy, _Mapping]] = ..., ctc_loss: _Optional[_Union[CtcLoss, _Mapping]] = ..., nll_loss: _Optional[_Union[NllLoss, _Mapping]] = ..., poisson_nll_loss: _Optional[_Union[PoissonNllLoss, _Mapping]] = ..., gaussian_nll_loss: _Optional[_Union[GaussianNllLoss, _Mapping]] = ..., kl_div: _Optional[_Union[KlDiv, _Mapping]] = ..., binary_cross_entropy: _Optional[_Union[BinaryCrossEntropy, _Mapping]] = ..., binary_cross_entropy_with_logits: _Optional[_Union[BinaryCrossEntropyWithLogits, _Mapping]] = ..., margin_ranking_loss: _Optional[_Union[MarginRankingLoss, _Mapping]] = ..., hinge_embedding_loss: _Optional[_Union[HingeEmbeddingLoss, _Mapping]] = ..., multilabel_margin_loss: _Optional[_Union[MultilabelMarginLoss, _Mapping]] = ..., huber_loss: _Optional[_Union[HuberLoss, _Mapping]] = ..., smooth_l1_loss: _Optional[_Union[SmoothL1Loss, _Mapping]] = ..., soft_margin_loss: _Optional[_Union[SoftMarginLoss, _Mapping]] = ..., multilabel_soft_margin_loss: _Optional[_Union[MultilabelSoftMarginLoss, _Mapping]] = ..., cosine_embedding_loss: _Optional[_Union[CosineEmbeddingLoss, _Mapping]] = ..., multi_margin_loss: _Optional[_Union[MultiMarginLoss, _Mapping]] = ..., triplet_margin_loss: _Optional[_Union[TripletMarginLoss, _Mapping]] = ..., triplet_margin_with_distance_loss: _Optional[_Union[TripletMarginWithDistanceLoss, _Mapping]] = ..., linear_cross_entropy: _Optional[_Union[LinearCrossEntropy, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("loss", "gradients", "warnings")
    class GradientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    loss: Tensor
    gradients: _containers.MessageMap[str, Tensor]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loss: _Optional[_Union[Tensor, _Mapping]] = ..., gradients: _Optional[_Mapping[str, Tensor]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "message_type", "module", "tensors", "options", "summary")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    message_type: str
    module: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorArgument]
    options: _containers.RepeatedCompositeFieldContainer[OptionArgument]
    summary: str
    def __init__(self, name: _Optional[str] = ..., message_type: _Optional[str] = ..., module: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorArgument, _Mapping]]] = ..., options: _Optional[_Iterable[_Union[OptionArgument, _Mapping]]] = ..., summary: _Optional[str] = ...) -> None: ...

class TensorArgument(_message.Message):
    __slots__ = ("name", "required", "dtypes", "differentiable", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    DIFFERENTIABLE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    required: bool
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    differentiable: bool
    shape: str
    def __init__(self, name: _Optional[str] = ..., required: _Optional[bool] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., differentiable: _Optional[bool] = ..., shape: _Optional[str] = ...) -> None: ...

class OptionArgument(_message.Message):
    __slots__ = ("name", "type", "default_value", "allowed_values", "deprecated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_VALUES_FIELD_NUMBER: _ClassVar[int]
    DEPRECATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_value: str
    allowed_values: _containers.RepeatedScalarFieldContainer[str]
    deprecated: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_value: _Optional[str] = ..., allowed_values: _Optional[_Iterable[str]] = ..., deprecated: _Optional[bool] = ...) -> None: ...

class ComputeStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: ComputeRequest
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[ComputeRequest, _Mapping]] = ...) -> None: ...

class ComputeStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: ComputeResponse
    error: Error
    def __init__(self, id: _Optional[int] = ..., response: _Optional[_Union[ComputeResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
