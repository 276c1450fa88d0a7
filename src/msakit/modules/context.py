"""Utterance context: a bidirectional LSTM over the utterances of each video (bc-LSTM, Poria et
al., ACL 2017), usable in front of any fusion head.

The trainer batches whole videos for models with `whole_videos = True`; `Batch.group` [B] then
says which video of the batch each utterance belongs to (utterances of a video contiguous and in
temporal order). `ContextLSTM` scatters the batch's utterance vectors into
[num_videos, max_utterances, D] with a mask, runs a packed BiLSTM (so a video never sees another
video's utterances nor the padding) and gathers the outputs back to [B, D_out].
Without `group` (None) every utterance is its own video of length 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ACTIVATIONS = ("tanh", "relu", "none")


def video_positions(group: torch.Tensor | None, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [B], position [B]): a dense video index 0..V-1 and each utterance's position in
    its video (its rank among the batch rows of that video, in row order). group None -> each
    row is its own video."""
    if group is None:
        rows = torch.arange(size, device=device)
        return rows, torch.zeros_like(rows)
    _, video = torch.unique(group, return_inverse=True)  # [B] in 0..V-1
    onehot = F.one_hot(video, int(video.max()) + 1)  # [B, V]
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=1) - 1
    return video, position


def scatter_videos(
    x: torch.Tensor, group: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, D] -> padded [V, U, D], mask [V, U] (True = real utterance), video [B], position [B].
    U is the longest video of the batch; `padded[video, position]` gives x back."""
    video, position = video_positions(group, x.shape[0], x.device)
    num_videos, steps = int(video.max()) + 1, int(position.max()) + 1
    padded = x.new_zeros(num_videos, steps, x.shape[1])
    padded[video, position] = x
    mask = torch.zeros(num_videos, steps, dtype=torch.bool, device=x.device)
    mask[video, position] = True
    return padded, mask, video, position


class ContextLSTM(nn.Module):
    """x [B, D_in] + group [B] (or None) -> [B, out_dim].

    input dropout -> packed BiLSTM(hidden) over each video's utterances -> dropout ->
    Linear(2 * hidden, out_dim) -> activation, per utterance. bc-LSTM's "TimeDistributed(Dense)"
    after its Bidirectional(LSTM) is the Linear + activation here.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        activation: str = "tanh",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ContextLSTM: activation must be one of {ACTIVATIONS}")
        self.input_dropout = nn.Dropout(input_dropout)
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, out_dim)
        self.activation = activation
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        padded, mask, video, position = scatter_videos(self.input_dropout(x), group)  # [V, U, D]
        lengths = mask.sum(dim=1).cpu()
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=padded.shape[1])
        h = self.out(self.dropout(output[video, position]))  # [B, out_dim]
        if self.activation == "tanh":
            return torch.tanh(h)
        if self.activation == "relu":
            return F.relu(h)
        return h
