"""Using a trained model: images to class names (`classify`, shared by batch prediction and
the MLflow model), batch prediction on Ray Data (`predict`), accuracy on a split
(`evaluation`, shared by `vitray evaluate` and a search's test scoring)."""
