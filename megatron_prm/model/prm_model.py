"""Megatron-Core GPTModel whose last pipeline stage returns reward-token logits instead of LM logits."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_prm import megatron_compat
from megatron_prm.model.mlp_head import MLPRewardHead
from megatron_prm.model.reward_head import reward_logits


class PRMGPTModel(GPTModel):
    """GPTModel + the PRM head.

    The embedding, decoder and output-layer parameters are GPTModel's own, so Megatron's
    checkpointing, embedding-group gradient sync and parameter names apply unchanged; only the last
    step differs: the LM-head rows of the two reward tokens are applied at the labelled positions, or
    with ``reward_head="mlp"`` the :class:`MLPRewardHead` (the output layer is then unused and frozen).
    """

    def __init__(self, *args, reward_token_ids: tuple[int, int], reward_head: str = "lm_head", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.mtp_process:
            raise ValueError("multi-token prediction is not supported by the PRM head")
        self.register_buffer(
            "reward_token_ids", torch.tensor(reward_token_ids, dtype=torch.long), persistent=False
        )
        self.mlp_reward_head = MLPRewardHead(self.config) if reward_head == "mlp" and self.post_process else None
        if self.mlp_reward_head is not None and not self.share_embeddings_and_output_weights:
            self.output_layer.weight.requires_grad_(False)

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        reward_index: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Hidden states ``[s, b, h]`` on inner pipeline stages. On the last one: with ``reward_index``,
        the reward-token logits ``[n, 2]``; without it, the plain language model's output (what
        GPTModel returns: full-vocabulary logits ``[s, b, vocab / TP]``, or with ``labels`` the
        per-token cross-entropy ``[b, s]``), used to check conversions and to benchmark against LM
        training."""
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = (
            megatron_compat.gpt_preprocess(self, input_ids, position_ids, packed_seq_params)
        )
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        if not self.post_process:
            return hidden_states
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else self.output_layer.weight
        )
        if reward_index is None:
            logits, _ = self.output_layer(hidden_states, weight=weight)
            return logits if labels is None else self.compute_language_model_loss(labels, logits)
        if self.mlp_reward_head is not None:
            return self.mlp_reward_head(hidden_states, reward_index, self.pg_collection.tp, self.config.sequence_parallel)
        return reward_logits(
            hidden_states,
            reward_index,
            weight,
            self.reward_token_ids,
            self.pg_collection.tp,
            self.config.sequence_parallel,
        )
