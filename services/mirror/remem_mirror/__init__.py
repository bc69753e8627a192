"""remem mirror: a local write-behind copy of every page-out, for when the network is gone."""
