"""The data layer: sources (download, kaggle, synthetic), the layout, prepare and its audit, manifests, image
decoding, TFRecords, the tf.data input, class weights, the external set and the data report."""
