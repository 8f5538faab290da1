"""Graph convolutional net, full-graph semi-supervised node classification, trained by ULR.

The whole graph is one example whose rows are its nodes. Two things make that work:
``replicate=gnn.tile_graph`` makes the K noise copies of the graph (the node features are tiled,
the one sparse adjacency is shared and applied to all copies at once), and ``gnn.NodeLoss``
weights each node's noise by the loss of the labelled nodes it can reach (its receptive field),
which is what keeps the estimate unbiased when nodes influence each other.

    python examples/gnn.py                    # SBM graph, 3000 nodes, ~1 min
    python examples/gnn.py --data karate
    python examples/gnn.py --smoke
"""

import argparse

import torch

import ulr
from ulr.models import gnn

parser = argparse.ArgumentParser()
parser.add_argument("--data", choices=["sbm", "karate"], default="sbm")
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
torch.set_num_threads(2)

torch.manual_seed(0)
small = {"num_nodes": 300, "num_val": 50, "num_test": 100}
kwargs = small if args.smoke and args.data == "sbm" else {}
graph = ulr.data.load(args.data, **kwargs)
print(graph)
(x, adj), (y, train_mask) = graph.train  # inputs: features + normalised sparse adjacency
model = ulr.models.build("gcn", in_shape=graph.input_shape, num_classes=graph.num_classes)
est = ulr.LikelihoodRatio(model, noise=ulr.Gaussian(0.1), num_copies=32,
                          sampler=ulr.antithetic(), baseline=ulr.baselines.leave_one_out(),
                          plan=ulr.plans.layerwise(), replicate=gnn.tile_graph)
loss = gnn.NodeLoss(adj, hops=model.loss_hops)  # per-row weights: receptive-field losses
opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)

for epoch in range(2 if args.smoke else args.epochs):
    opt.zero_grad()
    est.loss_and_grads(loss, (x, adj), (y, train_mask))
    opt.step()
    if (epoch + 1) % 10 == 0 or args.smoke:
        with torch.no_grad():
            pred = model(x, adj).argmax(1)
        acc = (pred[graph.test_mask] == y[graph.test_mask]).float().mean().item()
        print(f"epoch {epoch + 1:3d}  test accuracy {acc:.3f}")
