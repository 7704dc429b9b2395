"""The MoE load-balancing loss as transformers defines it, trained and logged (:class:`LoadBalancing`).

transformers' ``load_balancing_loss_func`` (Qwen3-MoE, Qwen2-MoE and Mixtral; their causal LMs add
``router_aux_loss_coef`` times it to the loss of a forward pass) pools every layer's routing before it
multiplies. With ``n_e`` the top-k choices of expert ``e`` and ``p_e`` the sum of its softmax
probabilities, both over every layer's unpadded tokens (``attention_mask``), ``T`` the unpadded tokens of
the forward pass and ``L`` the layers:

    aux = E * sum_e (n_e / (L T)) * (p_e / (L T))

Megatron-Core's ``aux_loss`` is a sum of per-layer terms (each ``n_le / (k T)``), which this is not: it
equals ``k`` times Megatron's only for one layer, and pools the layers otherwise. Megatron's router
therefore runs without its own load-balancing loss (``moe_router_load_balancing_type: none``), and every
router hands its logits here (:func:`megatron_compat.observe_router_logits`): the forward pass adds up
``n_e``, ``p_e`` and ``T`` of a micro batch over the layers (and, where a sequence is split, over the
sequence- and context-parallel ranks), the loss function computes ``aux``, and because ``n_e`` depends on
every layer, the gradient ``d aux / d p_le = E n_e / (L T)^2`` is injected in the backward pass at each
layer's probability sums (as Megatron's ``MoEAuxLossAutoScaler`` injects its own); a layer recomputed in
the backward pass (activation recompute) gets it the same way.

Weight: Megatron-Core divides the gradients by the labelled steps ``N`` of the global batch
(``calculate_per_token_loss``), so a micro batch's term is multiplied by ``c N / (M D)`` (``M`` micro
batches per rank, ``D`` data-parallel ranks): the optimised loss is the PRM loss (mean over labelled
steps) plus ``c`` times the mean over the step's micro batches of ``aux``, which is transformers' loss
for a global batch of one micro batch. The pooled sums need every layer on one pipeline stage: under
pipeline parallelism Megatron-Core's own per-layer loss takes its place.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prm import megatron_compat
from megatron_prm.layout import ParallelLayout
from megatron_prm.model.moe import MixtureOfExperts


@dataclass
class _MicroBatchRouting:
    """The pooled routing of one micro batch on this rank (sums over the layers seen so far)."""

    mask: torch.Tensor  # float [s, b]: 1 at real tokens, sequence-major like the router's logits
    choices: torch.Tensor  # [E] n_e
    probabilities: torch.Tensor  # [E] p_e (detached)
    tokens: torch.Tensor  # [] T summed over the layers (L T)
    layers: int = 0
    gradient: Optional[torch.Tensor] = None  # [E] d (weighted aux) / d p_le, set once the forward pass is done


class _InjectGradient(torch.autograd.Function):
    """Passes the logits through; in the backward pass gives a layer's probability sums ``p_le`` the gradient
    of the weighted aux loss (known only once every layer has routed)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, probabilities: torch.Tensor, routing: _MicroBatchRouting):
        ctx.routing = routing
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gradient = ctx.routing.gradient
        scale = megatron_compat.moe_aux_loss_backward_scale(gradient.device)
        return grad, gradient * scale.to(gradient.dtype), None


@dataclass
class LoadBalancing:
    """transformers' load-balancing loss of one model chunk's MoE layers (see the module docstring)."""

    coefficient: float
    num_experts: int
    top_k: int
    num_layers: int
    token_group: Optional[dist.ProcessGroup] = None  # ranks holding parts of the same sequences (SP x CP)
    sequence_shard: tuple[int, int] = (0, 1)  # sequence parallelism: (TP rank, TP size) of the router input
    weight: float = 0.0  # c N / (M D) of the current step
    _current: Optional[_MicroBatchRouting] = field(default=None, repr=False)
    _recording: bool = field(default=False, repr=False)

    def begin_step(self, labelled_steps: int, num_microbatches: int, device: torch.device) -> None:
        """Weight the step's terms: this rank's ``labelled_steps`` in its ``num_microbatches`` (before the
        context-parallel split), summed over data parallel. Collective over data parallel."""
        steps = torch.tensor([float(labelled_steps)], dtype=torch.float64, device=device)
        dist.all_reduce(steps, group=parallel_state.get_data_parallel_group())
        self.weight = self.coefficient * steps.item() / (num_microbatches * parallel_state.get_data_parallel_world_size())
        self._current = None

    def end_step(self) -> None:
        """Forget the last micro batch (a later forward pass outside training attaches nothing)."""
        self._current = None

    @contextlib.contextmanager
    def recording(self, real_tokens: torch.Tensor) -> Iterator[None]:
        """Pool the routing of the forward pass run inside; ``real_tokens`` bool ``[b, s]`` of this rank."""
        mask = real_tokens.t().float()
        rank, size = self.sequence_shard
        if size > 1:
            mask = mask.chunk(size)[rank]
        zeros = torch.zeros(self.num_experts, dtype=torch.float32, device=mask.device)
        self._current = _MicroBatchRouting(mask, zeros, zeros.clone(), torch.zeros((), device=mask.device))
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def observe(self, logits: torch.Tensor) -> torch.Tensor:
        """The router hook: pools the layer's routing in the forward pass and attaches the gradient where
        the logits carry one (also when a layer is recomputed in the backward pass)."""
        routing = self._current
        if routing is None or not (self._recording or torch.is_grad_enabled()):
            return logits
        scores = torch.softmax(logits.reshape(-1, self.num_experts).float(), dim=-1)
        mask = routing.mask.reshape(-1, 1)
        probabilities = (scores * mask).sum(0)
        if self._recording:
            with torch.no_grad():
                chosen = scores.topk(self.top_k, dim=-1).indices
                routing.choices.scatter_add_(0, chosen.reshape(-1), mask.expand(-1, self.top_k).reshape(-1))
                routing.probabilities += probabilities.detach()
                routing.tokens += mask.sum()
                routing.layers += 1
        if torch.is_grad_enabled() and logits.requires_grad:
            logits = _InjectGradient.apply(logits, probabilities, routing)
        return logits

    def finish_micro_batch(self) -> torch.Tensor:
        """The micro batch's aux loss (without the coefficient), pooled over the sequence's ranks; sets the
        gradient the backward pass injects. Collective over ``token_group``."""
        routing = self._current
        if routing.layers != self.num_layers:
            raise RuntimeError(f"{routing.layers} MoE layers routed this micro batch, expected {self.num_layers}")
        pooled = torch.cat([routing.choices, routing.probabilities, routing.tokens.reshape(1)])
        if self.token_group is not None and dist.get_world_size(self.token_group) > 1:
            dist.all_reduce(pooled, group=self.token_group)
        choices, probabilities, tokens = pooled[:self.num_experts], pooled[self.num_experts:-1], pooled[-1]
        if tokens == 0:  # nothing but padding: no term
            routing.gradient = torch.zeros_like(choices)
            return tokens
        routing.gradient = self.weight * self.num_experts * choices / tokens**2
        return self.num_experts * torch.sum(choices / tokens * probabilities / tokens)


def resolved_coefficient(moe: MixtureOfExperts, coefficient: Optional[float]) -> float:
    """``moe_aux_loss_coeff`` as configured, or the base's ``router_aux_loss_coef`` where it is null."""
    return moe.router_aux_loss_coef if coefficient is None else coefficient


def megatron_load_balancing_coefficient(moe: Optional[MixtureOfExperts], coefficient: Optional[float],
                                        layout: ParallelLayout) -> float:
    """The coefficient of Megatron-Core's own load-balancing loss: 0, except under pipeline parallelism,
    where no stage sees every layer's routing and transformers' pooled loss cannot be formed; there each
    layer's Megatron ``aux_loss`` (for one layer, 1 / top_k of transformers') is summed instead."""
    if moe is None or layout.pipeline_parallel_size == 1:
        return 0.0
    return resolved_coefficient(moe, coefficient)


def pipeline_note(moe: Optional[MixtureOfExperts], coefficient: Optional[float], layout: ParallelLayout) -> Optional[str]:
    """The line that says a run uses Megatron-Core's per-layer loss instead of transformers', or None."""
    if not megatron_load_balancing_coefficient(moe, coefficient, layout):
        return None
    return (f"pipeline_parallel_degree {layout.pipeline_parallel_size}: the load-balancing loss is Megatron-Core's "
            "per-layer aux_loss summed over the layers (transformers' pools every layer's routing, which no "
            "pipeline stage holds)")


def install_load_balancing(chunks: list[torch.nn.Module], moe: Optional[MixtureOfExperts],
                           coefficient: Optional[float], layout: ParallelLayout) -> Optional[LoadBalancing]:
    """Route the MoE layers' logits of the training model ``chunks`` through a :class:`LoadBalancing`, kept as
    the chunk's ``load_balancing`` attribute. ``coefficient`` None: the base's ``router_aux_loss_coef``.
    None for a dense model, coefficient 0 or pipeline parallelism (see
    :func:`megatron_load_balancing_coefficient`)."""
    if moe is None or layout.pipeline_parallel_size > 1:
        return None
    coefficient = resolved_coefficient(moe, coefficient)
    if not coefficient:
        return None
    split = layout.sequence_parallel and layout.tensor_parallel_size > 1
    shard = (parallel_state.get_tensor_model_parallel_rank(), layout.tensor_parallel_size) if split else (0, 1)
    group = (parallel_state.get_tensor_and_context_parallel_group() if split
             else parallel_state.get_context_parallel_group())
    (chunk,) = chunks
    balance = LoadBalancing(coefficient, moe.num_experts, moe.num_experts_per_tok, 0, group, shard)
    balance.num_layers = megatron_compat.observe_router_logits(chunk, balance.observe)
    chunk.load_balancing = balance
    return balance


def step_load_balancing_loss(reports: list[dict], num_microbatches: int, device: torch.device) -> dict[str, float]:
    """The step's ``moe_load_balancing_loss`` for the log: the mean of the micro batches' aux losses over the
    micro batches and data-parallel ranks (without the coefficient); empty without one. Collective over data
    parallel."""
    values = [report["moe_load_balancing_loss"] for report in reports if "moe_load_balancing_loss" in report]
    if not values:
        return {}
    total = torch.stack(values).sum().to(device=device, dtype=torch.float64).reshape(1)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return {"moe_load_balancing_loss": total.item() / (num_microbatches * parallel_state.get_data_parallel_world_size())}


def load_balancing_of(model: torch.nn.Module) -> Optional[LoadBalancing]:
    """The :class:`LoadBalancing` of a (DDP / Float16Module wrapped) model chunk, if it has one."""
    while not hasattr(model, "load_balancing") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "load_balancing", None)
