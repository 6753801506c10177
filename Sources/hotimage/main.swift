print("hotimage")
