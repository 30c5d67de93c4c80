"""moeyard.offload"""
