"""Registration: from a starting pose to the pose whose rendered silhouette matches the mask."""
