"""The Dagster layer of spkenc: assets, resources and sensors over the spkenc library."""
