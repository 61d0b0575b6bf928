"""The federation: sub-transformers joined by the spec's edges and run as one module (design 000).

- `executor`: `Federation` and its plan (`FederationPlan`, `GroupPlan`, `EdgePlan`): the stages,
  the batched groups, the message bus, `cross` attention edges, and unrolled/truncated feedback.
- `equilibrium`: `EquilibriumSolver`, the deep-equilibrium solve of `mode: equilibrium` feedback
  (fixed point, implicit gradient, Lipschitz bound), and the NaN/Inf check both loops share.
- `messages`: edge features and per-stage edge lists (no torch-geometric import).
- `message_layer`: `EdgeConditionedMessage`, the torch-geometric layer, imported only by models
  whose edges pass messages.

Nothing is re-exported here: import from the modules (importing this package stays free).
"""
