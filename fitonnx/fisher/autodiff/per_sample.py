"""Per-sample squared weight-gradient norms from one batched backward pass (filled in below)."""

from __future__ import annotations
