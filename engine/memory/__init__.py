"""The expert memory hierarchy: host tier, budgeted device expert cache, async loader, policies."""
