"""Where results live and how grids run: the results store (`store`, the only writer of results)
and the grid runner (`runner`: cells, local or Ray executors, `ModelHandle`)."""
